r"""NUS-WIDE, all 81 concepts (the DeepHash `nuswide_81_m` lists), with the paper's model and optimiser.

  python -m hybridhash_jax.main --config=configs/nuswide_81_m.py:bits=64 --workdir=/tmp/hh_nuswide_81_m_64 \
      --config.data.list_dir=LISTS --config.data.root=IMAGES --config.init_checkpoint=/tmp/nest_b_init
  python -m hybridhash_jax.main --config=configs/nuswide_81_m.py:bits=32,runlocal --workdir=/tmp/hh_local ...

Arguments (`:k=v,...`): bits=16|32|48|64 (64), runlocal, dtype, and the ablation switches
token_layout, interaction, hash_global, memory_bank_size, optimizer, as in configs/cifar10.py.

Data (the DeepHash protocol): DeepHash-style lists `train.txt`, `test.txt` (the queries), `database.txt`
in --config.data.list_dir (default data/nuswide_81_m), image paths relative to --config.data.root
(default data/nuswide_81_m). 10,000 train, 5,000 queries, the rest as database; 81 classes; mAP@5000.
Schedule: batch 64, RMSprop 2.5e-5, weight decay 1e-5, 12 epochs, evaluated every 3 (the reference's
ImageNet-100 log). NesT-B start: convert as in configs/cifar10.py (with --config configs/nuswide_81_m.py)
and pass --config.init_checkpoint=DIR.

What to expect: no reference log is published for this dataset, so the reproduction table
shows none.
"""

from hybridhash_jax import config_args


def get_config(arg=None):
  return config_args.listfile_config("nuswide_81_m", arg)
