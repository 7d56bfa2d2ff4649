r"""ImageNet-100 (the DeepHash `imagenet` lists, 100 ImageNet-1k classes): the paper's model and optimiser.

  python -m hybridhash_jax.main --config=configs/imagenet.py:bits=64 --workdir=/tmp/hh_imagenet_64 \
      --config.data.list_dir=LISTS --config.data.root=IMAGES --config.init_checkpoint=/tmp/nest_b_init
  python -m hybridhash_jax.main --config=configs/imagenet.py:bits=32,runlocal --workdir=/tmp/hh_local ...

Arguments (`:k=v,...`): bits=16|32|48|64 (64), runlocal, dtype, and the ablation switches
token_layout, interaction, hash_global, memory_bank_size, optimizer, as in configs/cifar10.py.

Data (the DeepHash protocol): DeepHash-style lists `train.txt`, `test.txt` (the queries), `database.txt`
in --config.data.list_dir (default data/imagenet), image paths relative to --config.data.root
(default data/imagenet). 13,000 train, 5,000 queries, 128,503 database; 100 classes; mAP@1000.
Schedule: batch 64, RMSprop 2.5e-5, weight decay 1e-5, 12 epochs, evaluated every 3 (the reference's
ImageNet-100 log). NesT-B start: convert as in configs/cifar10.py (with --config configs/imagenet.py)
and pass --config.init_checkpoint=DIR.

What to expect: the reference's released log (ImageNet-100, mAP@1000, batch 64, the best of the
evaluations every 3 epochs on the query set; `results.json` reports it as `best`, beside the final):
  bits  16      32      48      64
  mAP   0.8028  0.8886  0.9095  0.9211
"""

from hybridhash_jax import config_args

REFERENCE = dict(metric="mAP@1000", source="HybridHash reference, released log (best of evaluations)",
                 map={16: 0.8028, 32: 0.8886, 48: 0.9095, 64: 0.9211})


def get_config(arg=None):
  return config_args.listfile_config("imagenet", arg)
