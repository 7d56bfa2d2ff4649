"""Your own labelled images: `root/<class_name>/<image>`, one sub-folder per class.

  python -m hybridhash_jax.main --config=configs/folder.py --config.data.root=DIR --workdir=W

Classes are the sorted sub-folder names. Per class, `data.query_per_class` images (seeded) are
queries, `data.train_per_class` are for training and the rest form the database; the split is
saved in W/splits.json and reused. The defaults train a small model on a CPU in minutes for a few
thousand small images (each class needs more than 10 + 50 images; lower the two fields if not).
Unreadable images stop the run naming the file; `--config.data.on_bad_image=skip` skips and lists
them in W/skipped_images.txt instead.

To scale up to the paper's model: keep `config_lib.PAPER_MODEL` (img 224, patch 4, widths
(128, 256, 512), depths (2, 2, 15), heads (4, 8, 16)), start from converted NesT-B weights
(`init_checkpoint`), use the reference optimiser (rmsprop, lr 2.5e-5), batch 64, and run on an
accelerator with `model.dtype="bfloat16"` and `data.num_workers` ~ the host's cores.
"""

from hybridhash_jax import config_lib


def get_config():
  c = config_lib.base_config()
  c.model.update(img_size=32, patch_size=2, embed_dims=(32, 64, 128), num_heads=(2, 4, 8), depths=(1, 1, 2),
                 bits=32, drop_path_rate=0.1)
  c.data.update(name="folder", root="", num_classes=-1, query_per_class=10, train_per_class=50, num_workers=2)
  c.optimizer.update(name="adamw", learning_rate=1e-3, weight_decay=1e-4)
  c.batch_size = 32
  c.eval_batch_size = 128
  c.num_epochs = 20
  c.eval_every_epochs = 5
  c.log_every_steps = 20
  c.checkpoint_every_steps = 200
  return c
