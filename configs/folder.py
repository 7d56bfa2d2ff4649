"""Your own labelled images: `root/<class_name>/<image>`, one sub-folder per class.

  python -m hybridhash_jax.main --config=configs/folder.py --config.data.root=DIR --workdir=W

Classes are the sorted sub-folder names. As in DeepHash's NUS-WIDE protocol, per class
`data.query_per_class` images (50, seeded) are held-out queries and the rest form the database,
which is also the training set (`data.train_per_class=-1`; N draws N per class from it instead).
The split is saved in W/splits.json and reused. A class with too few images stops the run naming
it and the value to set. The model is small (32 px, patch 4) and trained from scratch with
`config_lib.from_scratch` (no NesT-B download): a few CPU minutes for a few thousand images.
Unreadable images stop the run naming the file; `--config.data.on_bad_image=skip` skips and lists
them in W/skipped_images.txt instead.

To scale up to the paper's model: keep `config_lib.PAPER_MODEL` (img 224, patch 4, widths
(128, 256, 512), depths (2, 2, 15), heads (4, 8, 16)), start from converted NesT-B weights
(`init_checkpoint`), use the reference optimiser (rmsprop, lr 2.5e-5) and bank (`loss.bank_init=zeros`,
`model.hash_init_std=0.02`), batch 64, and run on an accelerator with `model.dtype="bfloat16"` and
`data.num_workers` ~ the host's cores.
"""

from hybridhash_jax import config_lib


def get_config():
  c = config_lib.base_config()
  c.model.update(img_size=32, patch_size=4, embed_dims=(32, 64, 128), num_heads=(2, 4, 8), depths=(1, 1, 1),
                 bits=32, drop_path_rate=0.0)
  c.data.update(name="folder", root="", num_classes=-1, query_per_class=50, train_per_class=-1, num_workers=2)
  config_lib.from_scratch(c)
  c.batch_size = 32
  c.eval_batch_size = 128
  c.num_epochs = 15
  c.eval_every_epochs = 5
  c.log_every_steps = 20
  c.checkpoint_every_steps = 200
  return c
