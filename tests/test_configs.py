"""Every config file and argument: it validates, its model has the parameter count of an independent
formula (checked against the paper model's 55,586,240), its data pipeline builds, bad arguments name
themselves, the ablation switches change the model as documented, and a missing dataset ends
`main` with one message and no traceback.
"""

import functools
import itertools
import subprocess
import sys

from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import pytest

from hybridhash_jax import checkpoints
from hybridhash_jax import config_args
from hybridhash_jax import config_lib
from hybridhash_jax import input_pipeline
from hybridhash_jax import losses
from hybridhash_jax import models
from hybridhash_jax import optim
from tests import data_fixtures
from tests.helpers import REPO, cli_env

LISTFILE = ("nuswide_21", "nuswide_81_m", "coco", "imagenet")
CLASSES = {"nuswide_21": 21, "nuswide_81_m": 81, "coco": 80, "imagenet": 100}
TOP_K = {"nuswide_21": 5000, "nuswide_81_m": 5000, "coco": 5000, "imagenet": 1000}
PROTOCOL_SIZES = {"cifar10": (1000, 5000, 54000), "cifar10-1": (1000, 5000, 59000),
                  "cifar10-2": (10000, 50000, 50000)}  # (query, train, database)


def load(name: str, arg: str | None = None):
  return config_args.load(str(REPO / "configs" / f"{name}.py") + (f":{arg}" if arg else ""))


def expected_params(img, patch, dims, depths, bits, interaction=True, hash_global=True) -> int:
  """The parameter count read off the architecture's layer shapes (not from the model code)."""
  grid = img // patch
  block = grid // 2 ** (len(dims) - 1)
  n = 3 * patch * patch * dims[0] + dims[0]  # patch embedding
  for i, (c, depth) in enumerate(zip(dims, depths)):
    side = grid // 2 ** i
    if i:
      cin = dims[i - 1]
      n += 9 * cin * c + c + 2 * c  # 3x3 conv + LayerNorm (NesT's pool, or the interaction's local branch)
      if interaction:  # 1x1 conv, global attention (qkv no bias, proj, pos embed over the pooled tokens)
        n += cin * c + 4 * c * c + c + (2 * side // block) ** 2 * c
    n += side * side * c + depth * (12 * c * c + 13 * c)  # pos embed + layers (2 LN, qkv, proj, MLP 4x)
  c = dims[-1]
  n += 2 * c + 2 * (3 * c * c + c) + c * bits + bits  # final norm, 1x3 and 3x1 convs, 1x1 conv to bits
  if hash_global:
    n += 4 * c * c + 2 * c  # global attention over one token
  return n


@functools.cache
def _abstract_params(model_items: tuple):
  model = models.from_config(dict(model_items))
  size = model.img_size
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))["params"])


def abstract_params(config):
  """Shapes only (no allocation), cached per model config: the grid has few distinct models."""
  return _abstract_params(tuple(sorted(config.model.items())))


def param_count(config) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params(config)))


def all_args():
  for bits, runlocal in itertools.product(config_args.BITS, (False, True)):
    suffix = ",runlocal" if runlocal else ""
    for protocol, source in itertools.product(PROTOCOL_SIZES, ("tfds", "archive")):
      yield "cifar10", f"bits={bits},protocol={protocol},source={source}{suffix}"
    for name in LISTFILE:
      yield name, f"bits={bits}{suffix}"


def test_spec_param_counts():
  assert expected_params(224, 4, (128, 256, 512), (2, 2, 15), 64) == 55_586_240
  assert expected_params(224, 4, (128, 256, 512), (2, 2, 15), 16) == 55_561_616


def test_every_config_and_argument():
  seen = 0
  for name, arg in all_args():
    c = load(name, arg)
    if c.data.source == "archive":
      c.data.root = "/data/cifar-10-python.tar.gz"  # the one field a run must give as a flag
    config_lib.validate(c)
    input_pipeline.validate(c.data)
    m = c.model
    assert m.bits == int(arg.split(",")[0].split("=")[1])
    assert param_count(c) == expected_params(m.img_size, m.patch_size, m.embed_dims, m.depths, m.bits), (name, arg)
    if "runlocal" in arg:
      assert (m.img_size, m.embed_dims, m.depths, m.dtype) == (32, (16, 32, 64), (1, 1, 1), "float32")
      assert c.num_train_steps > 0 and c.batch_size % 4 == 0
    else:
      assert (m.img_size, m.patch_size, m.embed_dims, m.num_heads, m.depths) == (
          224, 4, (128, 256, 512), (4, 8, 16), (2, 2, 15))
      assert m.dtype == "bfloat16" and c.batch_size == 64 and c.num_train_steps == -1
      assert (c.optimizer.name, c.optimizer.learning_rate, c.optimizer.weight_decay) == ("rmsprop", 2.5e-5, 1e-5)
    if name == "cifar10":
      assert (c.data.name, c.data.num_classes, c.data.top_k) == ("cifar10", 10, -1)
      assert c.data.protocol in arg and c.data.source in arg
    else:
      assert (c.data.name, c.data.num_classes, c.data.top_k) == ("listfile", CLASSES[name], TOP_K[name])
    seen += 1
  assert seen == 4 * 2 * (6 + 4)


def test_paper_schedule_is_about_2400_updates():
  """Every CIFAR-10 protocol gets the ImageNet-100 log's budget (12 epochs x 13,000 / 64 = 2,437 steps)."""
  for protocol, (_, train, _) in PROTOCOL_SIZES.items():
    c = load("cifar10", f"protocol={protocol}")
    steps = c.num_epochs * (train // c.batch_size)
    assert 2300 <= steps <= 2450, (protocol, steps)
    assert c.num_epochs % c.eval_every_epochs == 0
  c = load("imagenet")
  assert (c.num_epochs, c.eval_every_epochs, c.batch_size) == (12, 3, 64)


def test_config_flags_passes_the_argument():
  """What `main.py` does: config_flags hands the text after ':' to get_config, then applies overrides."""
  argv = ["prog", f"--config={REPO}/configs/cifar10.py:bits=32,runlocal,protocol=cifar10-2", "--config.seed=7"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  c = fv.config
  assert (c.model.bits, c.model.img_size, c.data.protocol, c.seed) == (32, 32, "cifar10-2", 7)


def test_reference_numbers_match_spec_and_docstrings():
  spec = {"cifar10": {16: 0.9487, 32: 0.9530, 48: 0.9516, 64: 0.9528},  # MambaHash's released log
          "imagenet": {16: 0.8028, 32: 0.8886, 48: 0.9095, 64: 0.9211}}  # HybridHash reference log
  for name in ("cifar10",) + LISTFILE:
    module = config_args.load_module(str(REPO / "configs" / f"{name}.py"))
    assert f"python -m hybridhash_jax.main --config=configs/{name}.py" in module.__doc__
    reference = getattr(module, "REFERENCE", None)
    assert (reference or {}).get("map") == spec.get(name), name
    for value in spec.get(name, {}).values():
      assert f"{value:.4f}" in module.__doc__
  assert "MambaHash" in config_args.load_module(str(REPO / "configs" / "cifar10.py")).REFERENCE["source"]


def test_loaded_config_is_locked():
  c = load("cifar10")
  with pytest.raises(AttributeError):
    c.model.bitz = 3


@pytest.mark.parametrize("name,arg,message", [
    ("cifar10", "bits=65", "configs/cifar10.py: bits must be one of 16, 32, 48, 64, got '65'"),
    ("imagenet", "bits=sixteen", "configs/imagenet.py: bits must be an integer, got 'sixteen'"),
    ("cifar10", "protocol=cifar100", "protocol must be one of cifar10, cifar10-1, cifar10-2, got 'cifar100'"),
    ("cifar10", "source=web", "source must be one of tfds, archive, got 'web'"),
    ("coco", "protocol=cifar10", "configs/coco.py: unknown argument 'protocol'; known: bits, runlocal"),
    ("nuswide_21", "bits=16,lr=3", "unknown argument 'lr'"),
    ("cifar10", "interaction=maybe", "interaction must be True or False, got 'maybe'"),
    ("cifar10", "bits", "argument 'bits' needs a value"),
    ("cifar10", "token_layout=channels", "token_layout must be one of reference, spatial, got 'channels'"),
])
def test_bad_arguments_name_themselves(name, arg, message):
  with pytest.raises(ValueError) as e:
    load(name, arg)
  assert message in str(e.value)


def test_argument_syntax():
  c = load("cifar10", " bits=16 , runlocal=True,interaction=false,,hash_global=0,memory_bank_size=10000 ")
  assert (c.model.bits, c.model.img_size, c.model.interaction, c.model.hash_global) == (16, 32, False, False)
  assert c.loss.memory_bank_size == 10000 and load("cifar10", "").model.bits == 64
  assert losses.bank_size(c.loss.memory_bank_size, 5000) == 10000  # the reference's CIFAR quirk
  assert losses.bank_size(load("cifar10").loss.memory_bank_size, 5000) == 5000
  assert load("coco", "optimizer=adamw").optimizer.name == "adamw"
  assert load("coco", "dtype=float32").model.dtype == "float32"
  assert load("coco", "runlocal,dtype=bfloat16").model.dtype == "bfloat16"  # explicit beats the runlocal default


def _paths(params) -> set[str]:
  return {"/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)}


@pytest.mark.slow
def test_ablation_switches_change_the_model():
  params = _paths(abstract_params(load("cifar10", "runlocal")))
  no_inter = _paths(abstract_params(load("cifar10", "runlocal,interaction=False")))
  no_hash_global = _paths(abstract_params(load("cifar10", "runlocal,hash_global=False")))
  glob = {p for p in params if "global_attention" in p}
  assert glob and all(p.startswith(("levels_1/pool/", "levels_2/pool/", "hashlayer/")) for p in glob)
  removed = params - no_inter  # the interaction modules' global branches (1x1 conv, global attention)
  assert removed and all(p.startswith(("levels_1/pool/", "levels_2/pool/")) for p in removed)
  assert not any(p.startswith("levels_") and "global_attention" in p for p in no_inter)
  assert params - no_hash_global == {p for p in glob if p.startswith("hashlayer/global_attention/")}
  assert no_hash_global <= params and no_inter <= params
  for arg, interaction, hash_global in (("interaction=False", False, True), ("hash_global=False", True, False),
                                        ("interaction=False,hash_global=False", False, False)):
    for size in ("runlocal,", ""):
      c = load("cifar10", size + arg)
      m = c.model
      assert param_count(c) == expected_params(m.img_size, m.patch_size, m.embed_dims, m.depths, m.bits,
                                               interaction, hash_global), arg


@pytest.mark.slow
def test_token_layout_changes_outputs_not_params():
  configs = {layout: load("cifar10", f"runlocal,token_layout={layout}") for layout in ("reference", "spatial")}
  shapes = {k: jax.tree.map(lambda a: (a.shape, a.dtype), abstract_params(c)) for k, c in configs.items()}
  assert shapes["reference"] == shapes["spatial"]
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3))
  reference, spatial = (models.from_config(c.model) for c in configs.values())
  variables = jax.jit(reference.init)(jax.random.PRNGKey(0), x)
  # Non-zero global position embeddings, so the layout of the tokens they are added to matters too.
  variables = jax.tree_util.tree_map_with_path(
      lambda path, v: v + 0.02 if "pos_embed_glo" in jax.tree_util.keystr(path) else v, variables)
  out_ref, out_spatial = (np.asarray(jax.jit(m.apply)(variables, x)) for m in (reference, spatial))
  diff = np.abs(out_ref - out_spatial).max()
  assert diff > 0.01 * np.abs(out_ref).max(), diff


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
  return data_fixtures.write_cifar(str(tmp_path_factory.mktemp("cifar")), "py")


@pytest.mark.parametrize("protocol", sorted(PROTOCOL_SIZES))
@pytest.mark.slow
def test_cifar10_pipeline_per_protocol(cifar_root, tmp_path, protocol):
  c = load("cifar10", f"runlocal,source=archive,protocol={protocol}")
  c.data.root = cifar_root
  splits = input_pipeline.build_splits(c, str(tmp_path))
  assert (len(splits.query), len(splits.train), len(splits.database)) == PROTOCOL_SIZES[protocol]
  assert (splits.num_classes, splits.top_k) == (10, PROTOCOL_SIZES[protocol][2])
  for split, size in zip(("query", "train", "database"), PROTOCOL_SIZES[protocol]):
    counts = np.bincount(np.argmax(getattr(splits, split).labels, axis=1), minlength=10)
    assert counts.tolist() == [size // 10] * 10, split
  batch = next(iter(input_pipeline.eval_batches(c, splits.query, local_batch_size=8)))
  assert batch["image"].shape == (8, 32, 32, 3) and batch["label"].shape == (8, 10)


@pytest.mark.parametrize("name", LISTFILE)
def test_listfile_pipeline(tmp_path, name):
  sizes = {"train": 6, "query": 3, "database": 9}
  data_fixtures.write_listfile(str(tmp_path / "data"), sizes, CLASSES[name])
  c = load(name, "bits=16,runlocal")
  c.data.update(list_dir=str(tmp_path / "data"), root=str(tmp_path / "data"))
  splits = input_pipeline.build_splits(c, str(tmp_path / "work"))
  assert (len(splits.train), len(splits.query), len(splits.database)) == (6, 3, 9)
  assert (splits.num_classes, splits.top_k) == (CLASSES[name], 9)  # mAP@K is capped by the database size
  batch = next(iter(input_pipeline.train_loader(c, splits, seed=0, local_batch_size=4)))
  assert batch["image"].shape == (4, 32, 32, 3) and batch["label"].shape == (4, CLASSES[name])


def _run_main(tmp_path, *flags):
  return subprocess.run([sys.executable, "-m", "hybridhash_jax.main", f"--workdir={tmp_path / 'work'}", *flags],
                        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize("flags,message", [
    pytest.param(("--config=configs/cifar10.py:runlocal,source=archive", "--config.data.root=/nonexistent/cifar"),
                 ("config.data.root='/nonexistent/cifar'", "cifar-10-python.tar.gz",
                  "https://www.cs.toronto.edu/~kriz/cifar"), marks=pytest.mark.slow),
    pytest.param(("--config=configs/cifar10.py:runlocal,source=tfds", "--config.data.tfds_data_dir={empty}"),
                 ("config.data.tfds_data_dir=", "ArrayRecord", "tfds build cifar10 --file_format=array_record"),
                 marks=pytest.mark.slow),
    (("--config=tests/configs/tiny_train.py", "--config.model.token_layout=channels"),
     ("config.model.token_layout='channels' is not one of ('reference', 'spatial')",)),
    pytest.param(("--config=tests/configs/tiny_train.py", "--config.model.param_dtype=bfloat16"),
                 ("config.model.param_dtype='bfloat16' cannot train", "no float32 master copy"),
                 marks=pytest.mark.slow),
])
def test_missing_dataset_or_bad_field_exits_with_one_message(tmp_path, flags, message):
  (tmp_path / "empty").mkdir()
  proc = _run_main(tmp_path, *(f.format(empty=tmp_path / "empty") for f in flags))
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  stderr = "\n" + proc.stderr  # a config error comes before any log line
  assert stderr.count("\nerror: ") == 1, proc.stderr[-3000:]
  error = stderr[stderr.index("\nerror: "):]  # the last thing main prints: sys.exit's message
  assert all(m in error for m in message), error


def test_model_fields_have_one_source():
  """The model's fields are the schema's, split once into checkpoint-checked and free ones."""
  arch, runtime = set(models.ARCHITECTURE_FIELDS), set(models.hybridhash.RUNTIME_FIELDS)
  assert not arch & runtime and arch | runtime == set(models.CONFIG_FIELDS)  # a new field must be put in one
  assert set(config_lib.base_config().model) == set(models.CONFIG_FIELDS)
  assert checkpoints.MODEL_FIELDS == tuple(f"model.{f}" for f in models.ARCHITECTURE_FIELDS)
  args = config_args.common_args()
  assert args["token_layout"].choices == models.TOKEN_LAYOUTS and args["optimizer"].choices == ("auto", *optim.NAMES)
  assert set(args["dtype"].choices) == {"auto", *models.DTYPES}
  assert config_lib.PAPER_MODEL == {k: getattr(models.HybridHash(), k) for k in config_lib.PAPER_MODEL}


def test_checkpoint_check_refuses_each_architecture_field_only():
  config = config_lib.base_config().to_dict()
  other = {"img_size": 112, "patch_size": 2, "embed_dims": (64, 128, 256), "num_heads": (2, 4, 8),
           "depths": (2, 2, 3), "bits": 32, "mlp_ratio": 2.0, "interaction": False, "hash_global": False,
           "token_layout": "spatial", "drop_path_rate": 0.1, "dtype": "bfloat16", "param_dtype": "bfloat16",
           "attention": "xla", "remat": "full", "hash_init_std": 0.1}
  assert set(other) == set(models.CONFIG_FIELDS)
  for field, value in other.items():
    changed = {**config, "model": {**config["model"], field: value}}
    if field in models.ARCHITECTURE_FIELDS:
      with pytest.raises(ValueError, match=rf"model\.{field}: checkpoint has"):
        checkpoints.check_compatible(config, changed, "ckpt")
    else:
      checkpoints.check_compatible(config, changed, "ckpt")  # precision and training-only fields may differ


@pytest.mark.parametrize("field,value,why", [
    ("model.dtype", "float16", "is not one of"), ("model.param_dtype", "int8", "is not one of"),
    ("model.token_layout", "channels", "is not one of"), ("optimizer.name", "sgd", "is not one of"),
    ("optimizer.schedule", "linear", "is not one of"), ("loss.alpha", 0.0, "must be > 0"),
    ("optimizer.learning_rate", -1e-3, "must be > 0"), ("model.bits", 0, "must be > 0")])
def test_bad_config_values_are_named(field, value, why):
  """Choices come from their modules; sizes and rates must be positive."""
  c = config_lib.base_config()
  section, leaf = field.split(".")
  c[section][leaf] = value
  with pytest.raises(ValueError, match=rf"config\.{field}={value!r} {why}"):
    config_lib.validate(c)


def test_bfloat16_params_are_refused_for_training_only():
  c = config_lib.base_config()
  c.model.param_dtype = "bfloat16"
  config_lib.validate(c)  # evaluation and export may use them
  with pytest.raises(ValueError, match=r"config\.model\.param_dtype='bfloat16' cannot train"):
    config_lib.validate_training(c)
