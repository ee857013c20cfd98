"""Offloading (ZO2): block store, transfer scheduler, compressed transfers. See issue #3."""
