"""The allowed values of the config's string fields, in a module without jax.

`config_lib` and `config_args` check configs against them, and `models` and `optim` use them, so a
config file loads and fails on a bad value before anything imports jax.
"""

TOKEN_LAYOUTS = ("reference", "spatial")
DTYPES = ("float32", "bfloat16")
ATTENTIONS = ("einsum", "xla", "cudnn")  # the transformer layers' attention (`models.nest_blocks`)
REMATS = ("none", "full", "dots")  # rematerialisation per transformer layer (`models.hybridhash.REMAT_POLICIES`)
MODEL = {"token_layout": TOKEN_LAYOUTS, "dtype": DTYPES, "param_dtype": DTYPES, "attention": ATTENTIONS,
         "remat": REMATS}
OPTIMIZERS = ("rmsprop", "adamw")
SCHEDULES = ("constant", "warmup_cosine")
