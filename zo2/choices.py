"""The allowed values of zo2's settings, written once (a leaf: imports nothing).

The config validation (:mod:`zo2.config`), the kernels (:mod:`zo2.noise`), the update
rules (:mod:`zo2.rules`), the estimators, the model loader and the seed log all check
against these; a new value is added here and where it is implemented.
"""

DIRECTIONS = ("gaussian", "rademacher")  # the distribution of z
ROUNDINGS = ("nearest", "stochastic")  # of updated bf16 / fp16 weights
ESTIMATORS = ("two-sided", "one-sided", "one-point", "fzoo", "hizoo")
# Each update rule and its own settings (OptimConfig fields) besides lr and decay.
RULE_SETTINGS = {"zo-sgd": (), "zo-momentum": ("momentum", "history", "state_dtype"),
                 "zo-adam": ("beta1", "beta2", "adam_eps", "state_dtype"), "zo-sign": ()}
METHODS = tuple(RULE_SETTINGS)
# the OptimConfig fields that shape z (zo2.directions, zo2.hessian; HiZOO's estimator
# with its curvature); their defaults: dense
DIRECTION_SETTINGS = ("sparsity", "rank", "estimator", "hessian", "hessian_smooth")
# what else a seed log's replay needs to know of the run (zo2.quantized's clamp)
REPLAY_SETTINGS = DIRECTION_SETTINGS + ("scale_floor",)
HESSIANS = ("none", "diagonal", "factored")  # HiZOO's curvature estimate (optim.hessian)
QUANTIZATIONS = ("none", "nf4", "fp4", "int8")  # bitsandbytes bases (zo2.quantized)
DTYPES = ("float32", "bfloat16", "float16")  # model and host weights
WIRE_DTYPES = DTYPES + ("float8_e4m3fn", "float8_e5m2")  # offload transfers
SCHEDULES = ("constant", "linear", "cosine")  # of the learning rate
OBJECTIVES = ("label_words", "lm", "choice")  # the loss over labelled positions
ADAPTERS = ("none", "lora", "prefix")  # peft adapters trained instead of the weights
STATE_DTYPES = ("float32", "bfloat16")  # zo-momentum / zo-adam buffers
SLICINGS = ("auto", "on", "off")  # offloaded units split over a node's ranks
BACKENDS = ("auto", "nccl", "gloo")  # torch.distributed
WANDB_MODES = ("auto", "online", "offline", "off")
# your own rows: TRL's fields (text, prompt_completion, messages) or labelled ones
DATA_FORMATS = ("text", "prompt_completion", "messages", "classification", "choice")
EVAL_METRICS = ("auto", "loss", "accuracy", "exact_match", "f1")  # what picks best/
