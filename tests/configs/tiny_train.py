"""A seconds-fast run for the training tests: the digits set, a 16x16 model, 16 bits."""

from hybridhash_jax import config_lib


def get_config():
  c = config_lib.base_config()
  c.model.update(img_size=16, patch_size=2, embed_dims=(8, 16, 16), num_heads=(1, 2, 2), depths=(1, 1, 1),
                 bits=16, drop_path_rate=0.1)
  c.data.update(name="digits", num_classes=10, num_workers=0, query_per_class=5, train_per_class=20)
  c.optimizer.update(name="rmsprop", learning_rate=1e-3)
  c.batch_size = 8
  c.eval_batch_size = 64
  c.num_train_steps = 12
  c.eval_every_epochs = 1000
  c.log_every_steps = 1
  c.checkpoint_every_steps = 4
  return c
