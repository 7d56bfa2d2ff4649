"""A PyTorch peer of the authors' reference HybridHash, to time its CPU train step beside ours.

Written from the paper and docs/fidelity.md (the authors' code is not here). The module tree
reproduces the reference's state-dict names and shapes (`tests/golden/tiny112_state_dict.safetensors`
loads with strict=True) and its eval outputs (`tiny112_io.npz`), quirks included: NCHW maps as in
timm's NesT, head-minor head merge, the global attention's channel-first token layout, PyTorch
max-pool padding, bilinear upsampling with align_corners=False, the unused `FcLayer`. The reference's
computation order is kept (1x1 convs before their pools), so the timing is the reference's cost,
not that of our port's cheaper rewrites. Float32 only: the reference's fp16 autocast is not timed.

  python experiments/torch_reference.py --img_size 112 --batch_size 16 --steps 10 --threads 2
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-6
GLOBAL_HEADS = 8  # the reference's global attention always has 8 heads


def _init_weights(m: nn.Module) -> None:
  """The reference init: N(0, .02) truncated at +-2 absolute for Linear/Conv, zero biases, LN 1/0."""
  if isinstance(m, (nn.Linear, nn.Conv2d)):
    nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
    if m.bias is not None:
      nn.init.zeros_(m.bias)
  elif isinstance(m, nn.LayerNorm):
    nn.init.ones_(m.weight)
    nn.init.zeros_(m.bias)


def _attend(qkv: torch.Tensor, heads: int, fused: bool = False) -> torch.Tensor:
  """(..., N, 3C) -> (..., N, C): qkv features are (q|k|v, head, dim); heads merge head-minor."""
  *lead, n, c3 = qkv.shape
  d = c3 // 3 // heads
  q, k, v = qkv.reshape(*lead, n, 3, heads, d).movedim((-3, -2), (0, -3)).unbind(0)  # (..., H, N, d)
  if fused:
    out = F.scaled_dot_product_attention(q, k, v)
  else:
    out = ((q * d ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
  return out.movedim(-3, -1).reshape(*lead, n, heads * d)  # (..., N, d, H): channel = k*H + h


def _layer_norm_nchw(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
  return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
  """Per-sample stochastic depth: the branch is zeroed with probability `rate`, else scaled by 1/keep."""
  if not training or rate == 0.0:
    return x
  keep = 1.0 - rate
  mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
  return x * mask / keep


class Attention(nn.Module):
  """Block-local multi-head self-attention on (B, T, N, C), timm NesT layout."""

  def __init__(self, dim: int, heads: int, fused: bool = False):
    super().__init__()
    self.heads, self.fused = heads, fused
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    return self.proj(_attend(self.qkv(x), self.heads, self.fused))


class Mlp(nn.Module):
  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)  # exact erf GELU

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class TransformerLayer(nn.Module):
  """Pre-norm layer, stochastic depth on both residual branches."""

  def __init__(self, dim: int, heads: int, mlp_ratio: float, drop: float, fused: bool = False):
    super().__init__()
    self.drop = drop
    self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
    self.attn = Attention(dim, heads, fused)
    self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))

  def forward(self, x):
    x = x + drop_path(self.attn(self.norm1(x)), self.drop, self.training)
    return x + drop_path(self.mlp(self.norm2(x)), self.drop, self.training)


class GlobalAttention(nn.Module):
  """Attention among pooled tokens, with the reference's quirk (docs/fidelity.md).

  The pooled (B, C, h, w) memory is read as (B, h*w, C) without moving channels last; the output
  token t goes back to spatial position t (row-major) before `proj`.
  """

  def __init__(self, dim: int, tokens: int):
    super().__init__()
    self.pos_embed_glo = nn.Parameter(torch.zeros(1, tokens, dim))
    self.qkv = nn.Linear(dim, 3 * dim, bias=False)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, c, h, w = x.shape
    tokens = x.reshape(b, h * w, c) + self.pos_embed_glo  # the quirk: a reshape, not a permute
    y = self.proj(_attend(self.qkv(tokens), GLOBAL_HEADS))
    return y.reshape(b, h, w, c).permute(0, 3, 1, 2)


class Interaction(nn.Module):
  """Between levels: 3x3 conv + (1x1 conv -> pool b -> global attention -> upsample b), LN, max pool."""

  def __init__(self, dim_in: int, dim: int, block: int, tokens: int):
    super().__init__()
    self.block = block
    self.conv = nn.Conv2d(dim_in, dim, 3, padding=1)
    self.conv_glo = nn.Conv2d(dim_in, dim, 1, bias=False)
    self.global_attention = GlobalAttention(dim, tokens)
    self.norm = nn.LayerNorm(dim, eps=LN_EPS)

  def forward(self, x):
    g = self.global_attention(F.avg_pool2d(self.conv_glo(x), self.block))
    y = self.conv(x) + F.interpolate(g, scale_factor=self.block, mode="bilinear", align_corners=False)
    return F.max_pool2d(_layer_norm_nchw(self.norm, y), 3, 2, padding=1)  # symmetric pad 1 with -inf


def blockify(x: torch.Tensor, block: int) -> torch.Tensor:
  """(B, H, W, C) -> (B, T, N, C): blocks row-major, tokens row-major inside a block."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // block, block, w // block, block, c).transpose(2, 3)
  return x.reshape(b, (h // block) * (w // block), block * block, c)


def deblockify(x: torch.Tensor, block: int, grid: int) -> torch.Tensor:
  b, _, _, c = x.shape
  return x.reshape(b, grid, grid, block, block, c).transpose(2, 3).reshape(b, grid * block, grid * block, c)


class Level(nn.Module):
  """NCHW in and out: [interaction ->] blockify -> + pos embed -> transformer layers -> deblockify."""

  def __init__(self, dim_in, dim, heads, depth, block, blocks, drops, mlp_ratio, fused=False):
    super().__init__()
    self.block, self.grid = block, round(blocks ** 0.5)
    self.pool = nn.Identity() if dim_in is None else Interaction(dim_in, dim, block, 4 * blocks)
    self.pos_embed = nn.Parameter(torch.empty(1, blocks, block * block, dim))
    self.transformer_encoder = nn.Sequential(*[TransformerLayer(dim, heads, mlp_ratio, r, fused) for r in drops])

  def forward(self, x):
    x = blockify(self.pool(x).permute(0, 2, 3, 1), self.block) + self.pos_embed
    return deblockify(self.transformer_encoder(x), self.block, self.grid).permute(0, 3, 1, 2)


class HashLayer(nn.Module):
  """1x3 -> 3x1 convs + (pool -> global attention -> upsample), max pool, 1x1 conv to bits, mean, tanh."""

  def __init__(self, dim: int, bits: int, block: int):
    super().__init__()
    self.block = block
    self.convS1 = nn.Conv2d(dim, dim, (1, 3), padding=(0, 1))
    self.convS2 = nn.Conv2d(dim, dim, (3, 1), padding=(1, 0))
    self.global_attention = GlobalAttention(dim, 1)
    self.conv2 = nn.Conv2d(dim, bits, 1)

  def forward(self, x):
    g = self.global_attention(F.avg_pool2d(x, self.block))
    y = self.convS2(self.convS1(x)) + F.interpolate(g, scale_factor=self.block, mode="bilinear",
                                                   align_corners=False)
    y = self.conv2(F.max_pool2d(y, 3, 2, padding=1))
    return torch.tanh(y.mean(dim=(2, 3)))


class HybridHash(nn.Module):
  """Image (B, 3, H, W) -> tanh codes (B, bits); `return_features` also gives the final-norm NCHW map."""

  def __init__(self, img_size=224, patch_size=4, embed_dims=(128, 256, 512), num_heads=(4, 8, 16),
               depths=(2, 2, 15), bits=64, mlp_ratio=4.0, drop_path_rate=0.5, fused_attn=False):
    super().__init__()
    n = len(depths)
    grid = img_size // patch_size
    block = grid // 2 ** (n - 1)
    assert img_size % patch_size == 0 and block * 2 ** (n - 1) == grid, "needs whole blocks at every level"
    rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
    self.patch_embed = nn.Module()
    self.patch_embed.proj = nn.Conv2d(3, embed_dims[0], patch_size, stride=patch_size)
    levels, start = [], 0
    for i, (dim, heads, depth) in enumerate(zip(embed_dims, num_heads, depths)):
      levels.append(Level(None if i == 0 else embed_dims[i - 1], dim, heads, depth, block, 4 ** (n - 1 - i),
                          rates[start:start + depth], mlp_ratio, fused_attn))
      start += depth
    self.levels = nn.ModuleList(levels)
    self.norm = nn.LayerNorm(embed_dims[-1], eps=LN_EPS)
    self.hashlayer_train = HashLayer(embed_dims[-1], bits, block)
    self.FcLayer = nn.Linear(embed_dims[-1], bits)  # unused, as in the reference (counted in its params)
    self.apply(_init_weights)
    for level in self.levels:
      nn.init.trunc_normal_(level.pos_embed, std=0.02, a=-2.0, b=2.0)

  def forward(self, x, return_features: bool = False):
    x = self.patch_embed.proj(x)
    for level in self.levels:
      x = level(x)
    features = _layer_norm_nchw(self.norm, x)
    codes = self.hashlayer_train(features)
    return (codes, features) if return_features else codes


class MemoryBank:
  """The WMLE bank: the latest detached code and label of every training image."""

  def __init__(self, rows: int, bits: int, classes: int):
    self.U = torch.zeros(rows, bits)
    self.Y = torch.zeros(rows, classes)

  def update(self, u, y, index):
    self.U[index] = u.detach().float()
    self.Y[index] = y.detach().float()


def wmle_loss(u, y, U, Y, alpha: float = 0.5) -> torch.Tensor:
  """sum(w * l) / S over all (batch, bank) pairs; similar pairs weigh S / S1, dissimilar S / S0.

  The max(., 1) guards only matter for a class with no pairs, whose term is then 0 (not NaN).
  """
  U, Y = U.detach(), Y.detach()
  similar = (y.float() @ Y.T) > 0
  s = similar.float()
  theta = alpha * (u.float() @ U.T)
  l = torch.log1p(torch.exp(-theta.abs())) + theta.clamp(min=0) - s * theta
  n1 = s.sum()
  n = torch.tensor(float(s.numel()))
  n0 = n - n1
  w = torch.where(similar, n / n1.clamp(min=1), n / n0.clamp(min=1))
  return (w * l).sum() / n


def make_optimizer(params) -> torch.optim.RMSprop:
  """The paper's RMSprop: lr 2.5e-5, smoothing 0.99, eps 1e-8 (outside the root), L2 1e-5, no momentum."""
  return torch.optim.RMSprop(params, lr=2.5e-5, alpha=0.99, eps=1e-8, weight_decay=1e-5, momentum=0.0,
                             centered=False)


def measure(*, img_size, patch_size, embed_dims, depths, num_heads, bits, batch_size, steps=10, warmup=2,
            threads=2, drop_path=0.5, train_size=10000, seed=0, num_classes=10, fused_attn=False) -> dict:
  """Times full train steps (train-mode forward, bank write, loss, backward, RMSprop step) on CPU.

  Batches are synthetic (normal images, one-hot labels, distinct dataset indices) and made before
  timing, so only the step is timed, as in experiments/bench_train.py.
  """
  torch.set_num_threads(threads)
  torch.manual_seed(seed)
  model = HybridHash(img_size, patch_size, tuple(embed_dims), tuple(num_heads), tuple(depths), bits,
                     drop_path_rate=drop_path, fused_attn=fused_attn).train()
  opt = make_optimizer(model.parameters())
  bank = MemoryBank(train_size, bits, num_classes)
  g = torch.Generator().manual_seed(seed)
  batches = [(torch.randn(batch_size, 3, img_size, img_size, generator=g),
              F.one_hot(torch.randint(num_classes, (batch_size,), generator=g), num_classes).float(),
              torch.randperm(train_size, generator=g)[:batch_size]) for _ in range(warmup + steps)]
  step_s, losses = [], []
  for i, (x, y, index) in enumerate(batches):
    t0 = time.perf_counter()
    u = model(x)
    bank.update(u, y, index)
    loss = wmle_loss(u, y, bank.U, bank.Y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    dt = time.perf_counter() - t0
    if i >= warmup:
      step_s.append(dt)
      losses.append(float(loss.detach()))
  return dict(framework="torch", torch_version=torch.__version__, threads=torch.get_num_threads(),
              img_size=img_size, patch_size=patch_size, embed_dims=list(embed_dims), depths=list(depths),
              num_heads=list(num_heads), bits=bits, batch_size=batch_size, steps=steps, warmup=warmup,
              drop_path=drop_path, train_size=train_size, fused_attn=fused_attn,
              params=sum(p.numel() for p in model.parameters()),
              step_s=step_s, mean_step_s=sum(step_s) / len(step_s),
              images_per_s=batch_size * len(step_s) / sum(step_s), loss=losses)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ints = lambda s: tuple(int(v) for v in s.replace(",", "/").split("/"))
  p.add_argument("--img_size", type=int, default=112)
  p.add_argument("--patch_size", type=int, default=2)
  p.add_argument("--embed_dims", type=ints, default=(16, 32, 64), help="e.g. 16/32/64")
  p.add_argument("--depths", type=ints, default=(1, 1, 2))
  p.add_argument("--num_heads", type=ints, default=(2, 4, 8))
  p.add_argument("--bits", type=int, default=64)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--drop_path", type=float, default=0.5)
  p.add_argument("--train_size", type=int, default=10000)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--fused_attn", action="store_true", help="F.scaled_dot_product_attention in the blocks")
  print(json.dumps(measure(**vars(p.parse_args(argv)))))


if __name__ == "__main__":
  main()
