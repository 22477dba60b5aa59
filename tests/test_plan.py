"""The dispatchers' plans (ops.decode.plan, ops.gemv.plan) and the kernels' tuning dataclasses.

A plan reads only shapes and dtypes, so these run on any host: the device queries the decode's
choice depends on (device.is_hopper, device.num_sms) are patched where a test needs a Hopper GPU.
Running with the plan's tuning must give what running without one gives, bit for bit.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mla_jax import quant
from mla_jax.ops import Plan, decode, device, gemv
from mla_jax.ops.decode import cpu, mosaic, mosaic_heads, mosaic_int8, triton
from mla_jax.ops.gemv import mosaic as gemv_mosaic, triton as gemv_triton
from helpers import decode_inputs, gemv_weights

ON_GPU = jax.default_backend() == "gpu"
S = jax.ShapeDtypeStruct


def _decode_args(B=2, H=16, S_=1024, C=512, R=64, dtype=jnp.bfloat16, int8=False):
  args = [S((B, H, C), dtype), S((B, H, R), dtype), S((B, S_, C), dtype), S((B, S_, R), dtype),
          S((B,), jnp.int32)]
  if int8:
    args[2] = quant.Int8Rows(S((B, S_, C), jnp.int8), S((B, S_), jnp.float32))
  return args


@pytest.fixture
def hopper(monkeypatch):
  """The plans of a Hopper GPU with 132 SMs, on any host."""
  monkeypatch.setattr(device, "is_hopper", lambda: True)
  monkeypatch.setattr(device, "num_sms", lambda: 132)


# (tuning class, valid fields, a field, a value it refuses)
REFUSALS = [
    (triton.TritonTuning, dict(block_h=16, block_s=32, num_splits=4, num_warps=4, num_stages=3),
     "block_h", 8),
    (triton.TritonTuning, dict(block_h=16, block_s=32, num_splits=4, num_warps=4, num_stages=3),
     "block_s", 24),
    (triton.TritonTuning, dict(block_h=16, block_s=32, num_splits=4, num_warps=4, num_stages=3),
     "num_splits", 0),
    (triton.TritonTuning, dict(block_h=16, block_s=32, num_splits=4, num_warps=4, num_stages=3),
     "num_warps", 3),
    (triton.TritonTuning, dict(block_h=16, block_s=32, num_splits=4, num_warps=4, num_stages=3),
     "num_stages", 0),
    (triton.TritonTuning, dict(block_h=16, block_s=32, num_splits=4, num_warps=4, num_stages=3),
     "merge", "cuda"),
    (triton.TritonTuning, dict(block_h=16, block_s=32, num_splits=4, num_warps=4, num_stages=3),
     "partials", "float16"),
    (mosaic.MosaicTuning, dict(num_splits=4), "num_splits", 0),
    (mosaic.MosaicTuning, dict(num_splits=4), "stages", 0),
    (mosaic.MosaicTuning, dict(num_splits=4), "merge", "triton"),
    (mosaic_int8.MosaicInt8Tuning, dict(num_splits=4), "num_splits", -1),
    (mosaic_int8.MosaicInt8Tuning, dict(num_splits=4), "stages", 0),
    (mosaic_int8.MosaicInt8Tuning, dict(num_splits=4), "merge", None),
    (mosaic_heads.HeadsTuning, dict(num_splits=4), "num_splits", 2.0),
    (mosaic_heads.HeadsTuning, dict(num_splits=4), "merge", "mosaic"),
    (cpu.ShardTuning, dict(shard_size=64, shards_per_step=2), "shard_size", 0),
    (cpu.ShardTuning, dict(shard_size=64, shards_per_step=2), "shards_per_step", 0),
    (gemv_triton.TritonGemvTuning, {}, "block_n", 48),
    (gemv_triton.TritonGemvTuning, {}, "block_b", 3),
    (gemv_triton.TritonGemvTuning, {}, "num_warps", 6),
    (gemv_triton.TritonGemvTuning, {}, "num_stages", 0),
    (gemv_triton.TritonGemvTuning, {}, "block_k", 0),
    (gemv_triton.TritonGemvTuning, dict(dot=False), "int8", True),
    (gemv_mosaic.MosaicGemvTuning, {}, "stages", 0),
    (gemv_mosaic.MosaicGemvTuning, {}, "warpgroups", 0),
]


@pytest.mark.parametrize("cls,fields,name,bad", REFUSALS,
                         ids=[f"{c.__name__}.{n}" for c, _, n, _ in REFUSALS])
def test_tunings_refuse_bad_fields(cls, fields, name, bad):
  cls(**fields)  # the valid fields are accepted
  with pytest.raises(ValueError, match=rf"{cls.__name__}\.{name}=.*expected"):
    cls(**{**fields, name: bad})


def test_tunings_are_frozen():
  with pytest.raises(dataclasses.FrozenInstanceError):
    mosaic.MosaicTuning(num_splits=2).num_splits = 3


@pytest.mark.parametrize("H,int8,kernel", [(16, False, "mosaic"), (1, False, "mosaic"),
                                           (32, False, "mosaic"), (16, True, "mosaic_int8"),
                                           (20, True, "mosaic_int8"), (128, False, "mosaic_heads"),
                                           (40, False, "mosaic_heads"), (128, True, "triton")])
def test_decode_plan_on_hopper(hopper, H, int8, kernel):
  """The heads and the cache decide the Mosaic kernel; many heads over an int8 cache, which no
  Mosaic kernel takes, stay on Triton."""
  del hopper
  args = _decode_args(H=H, int8=int8)
  plan = decode.plan(*args, impl="pallas")
  assert plan.kernel == kernel and plan.impl == "pallas"
  assert decode.plan(*args, impl="pallas", interpret=True).kernel == "triton"
  assert decode.plan(*args, impl="pallas", lowering="triton").kernel == "triton"


def test_decode_plan_without_hopper():
  """Interpret mode (and any GPU but Hopper) runs Triton unless lowering="mosaic" asks for the
  Mosaic kernel, which then follows from the heads and the cache."""
  for H, int8, kernel in [(16, False, "mosaic"), (16, True, "mosaic_int8"),
                          (128, False, "mosaic_heads")]:
    args = _decode_args(H=H, int8=int8)
    if not (ON_GPU and device.is_hopper()):
      assert decode.plan(*args, impl="pallas").kernel == "triton"
    assert decode.plan(*args, impl="pallas", interpret=True).kernel == "triton"
    assert decode.plan(*args, impl="pallas", lowering="mosaic", interpret=True).kernel == kernel


def test_decode_plan_falls_back_where_mosaic_refuses(hopper):
  """C=1024 exceeds the Mosaic kernel's shared memory, float32 its dtypes: Triton runs them, and
  asking for Mosaic names the reason."""
  del hopper
  for args, reason in [(_decode_args(C=1024), "shared memory"),
                       (_decode_args(dtype=jnp.float32), "float32")]:
    assert decode.plan(*args, impl="pallas").kernel == "triton"
    with pytest.raises(ValueError, match=f"lowering='mosaic': .*{reason}"):
      decode.plan(*args, impl="pallas", lowering="mosaic")


def test_decode_plan_other_impls():
  args = _decode_args()
  plan = decode.plan(*args, impl="cpu")
  assert plan.kernel == "cpu" and isinstance(plan.tuning, cpu.ShardTuning)
  assert plan.tuning == cpu.choose_tuning(16, 512, 64, jnp.bfloat16)
  for impl in ("xla", "reference"):
    assert decode.plan(*args, impl=impl) == Plan(impl, impl, None)
  auto = decode.plan(*args)
  assert auto.impl == ("pallas" if ON_GPU else "cpu")
  with pytest.raises(ValueError, match="impl"):
    decode.plan(*args, impl="cuda")
  with pytest.raises(ValueError, match="lowering"):
    decode.plan(*args, impl="cpu", lowering="mosaic")
  with pytest.raises(ValueError, match="ShardTuning"):
    decode.plan(*args, impl="xla", tuning=cpu.ShardTuning(64, 2))
  with pytest.raises(ValueError, match="k_rope.shape"):
    decode.plan(*args[:3], S((2, 1000, 64), jnp.bfloat16), args[4], impl="cpu")


def test_decode_plan_reads_the_device(hopper, monkeypatch):
  """The split heuristics fill the SMs that device.num_sms reports."""
  del hopper
  args = _decode_args(B=1, S_=131072)
  full = decode.plan(*args, impl="pallas").tuning.num_splits
  monkeypatch.setattr(device, "num_sms", lambda: 66)
  assert decode.plan(*args, impl="pallas").tuning.num_splits == full // 2


def test_mismatched_tuning_names_both(hopper):
  del hopper
  args = _decode_args()
  triton_tuning = decode.plan(*args, impl="pallas", lowering="triton").tuning
  with pytest.raises(ValueError, match="TritonTuning.*'mosaic'.*MosaicTuning"):
    decode.plan(*args, impl="pallas", tuning=triton_tuning)
  with pytest.raises(ValueError, match="MosaicTuning.*'mosaic_int8'.*MosaicInt8Tuning"):
    decode.plan(*_decode_args(int8=True), impl="pallas", tuning=mosaic.MosaicTuning(4))
  with pytest.raises(ValueError, match="MosaicTuning.*'cpu'.*ShardTuning"):
    decode.plan(*args, impl="cpu", tuning=mosaic.MosaicTuning(4))
  x, w = S((2, 16, 192), jnp.bfloat16), S((16, 128, 512), jnp.bfloat16)
  with pytest.raises(ValueError, match="MosaicGemvTuning.*'triton'.*TritonGemvTuning"):
    gemv.plan(x, w, impl="pallas", tuning=gemv_mosaic.MosaicGemvTuning())


def test_plan_str_names_kernel_and_tuning(hopper):
  del hopper
  plan = decode.plan(*_decode_args(B=2, S_=8448, int8=True), impl="pallas")
  assert str(plan) == "pallas/mosaic_int8 num_splits=66 stages=4 merge=pallas"
  assert str(decode.plan(*_decode_args(), impl="xla")) == "xla"
  assert str(decode.plan(*_decode_args(), impl="cpu")).startswith("cpu shard_size=")
  gemv_plan = gemv.plan(S((2, 16, 576), jnp.bfloat16), S((16, 512, 128), jnp.bfloat16),
                        impl="pallas", lowering="mosaic")
  assert str(gemv_plan) == "pallas/mosaic stages=4 warpgroups=2 split_k=1"


def test_gemv_plan():
  x, w = S((2, 16, 192), jnp.bfloat16), S((16, 128, 512), jnp.bfloat16)
  plan = gemv.plan(x, w, impl="pallas")
  assert plan.kernel == "triton", "Triton is the default lowering"
  assert plan.tuning == gemv_triton.choose_tuning(2, 16, 128, 512, None)
  assert gemv.plan(x, w, impl="pallas", lowering="mosaic").kernel == "mosaic"
  assert gemv.plan(x, w) == Plan("xla", "xla", None)
  q8 = quant.QuantizedTensor(S((16, 128, 512), jnp.int8), S((16, 4, 512), jnp.float16), "q8_0")
  assert gemv.plan(x, q8, impl="pallas").tuning == gemv_triton.choose_tuning(2, 16, 128, 512,
                                                                             "q8_0")
  with pytest.raises(ValueError, match="lowering='mosaic'.*float32"):
    gemv.plan(S((2, 16, 192), jnp.float32), S((16, 128, 512), jnp.float32), impl="pallas",
              lowering="mosaic")
  with pytest.raises(ValueError, match="lowering"):
    gemv.plan(x, w, impl="xla", lowering="mosaic")


@pytest.mark.parametrize("impl,lowering,H,fmt", [("pallas", "triton", 16, "bfloat16"),
                                                 ("pallas", "triton", 4, "int8"),
                                                 ("pallas", "mosaic", 16, "bfloat16"),
                                                 ("pallas", "mosaic", 16, "int8"),
                                                 ("pallas", "mosaic", 64, "bfloat16"),
                                                 ("cpu", None, 16, "float32")])
def test_decode_with_the_plans_tuning_is_decode_without(rng, impl, lowering, H, fmt):
  if lowering == "mosaic" and ON_GPU and not device.is_hopper():
    pytest.skip("wgmma: Hopper")
  args = (*decode_inputs(rng, 2, H, 128, fmt), jnp.asarray([128, 45], jnp.int32))
  options = dict(impl=impl, lowering=lowering, interpret=not ON_GPU and impl == "pallas")
  plan = decode.plan(*args, **options)
  out, lse = decode.mla_decode(*args, sm_scale=0.1, **options)
  out_p, lse_p = decode.mla_decode(*args, sm_scale=0.1, tuning=plan.tuning, **options)
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(out_p, np.float32))
  np.testing.assert_array_equal(lse, lse_p)


@pytest.mark.parametrize("lowering", ["triton", "mosaic"])
def test_gemv_with_the_plans_tuning_is_gemv_without(rng, lowering):
  if lowering == "mosaic" and ON_GPU and not device.is_hopper():
    pytest.skip("wgmma: Hopper")
  x = jnp.asarray(rng.standard_normal((3, 2, 128 + 64)), jnp.bfloat16)
  w = gemv_weights(rng, 2, 128, 64, "q8_0")
  options = dict(impl="pallas", lowering=lowering, interpret=not ON_GPU)
  plan = gemv.plan(x, w, **options)
  np.testing.assert_array_equal(np.asarray(gemv.batched_gemv(x, w, **options), np.float32),
                                np.asarray(gemv.batched_gemv(x, w, tuning=plan.tuning, **options),
                                           np.float32))


def test_interpret_is_only_for_pallas(rng):
  """interpret=True with an implementation that runs no Pallas kernel is refused, not ignored."""
  args = (*decode_inputs(rng, 1, 4, 64, "float32"), jnp.asarray([5], jnp.int32))
  for impl in ("xla", "reference", "cpu"):
    with pytest.raises(ValueError, match="interpret=True"):
      decode.mla_decode(*args, sm_scale=0.1, impl=impl, interpret=True)
  x = jnp.zeros((1, 2, 64), jnp.float32)
  w = jnp.zeros((2, 64, 32), jnp.float32)
  with pytest.raises(ValueError, match="interpret=True"):
    gemv.batched_gemv(x, w, impl="xla", interpret=True)
  with pytest.raises(TypeError):
    decode.mla_decode(*args, sm_scale=0.1, impl="xla", interpet=True)  # a misspelt option
