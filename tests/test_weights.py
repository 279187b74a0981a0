"""Key mapping, strict loading and the pinned parameter count."""

import jax
import numpy as np
import pytest
pytest.importorskip("torch")  # compares against PyTorch; skipped without it
import torch
from diffusers import UNet2DModel

import jaxconsdec as jcd
from jaxconsdec.weights import path_to_torch_key, torch_to_flax_layout
from reference import diffusers_unet, state_dict_numpy, unet2d_kwargs


def test_released_parameter_count_is_pinned():
  assert jcd.param_count(jcd.CONSISTENCY_DECODER) == 621_277_702
  assert len(jax.tree.leaves(jcd.abstract_params(jcd.CONSISTENCY_DECODER))) == 407


def test_released_group_sizes_match_spec():
  # SPEC section 3: parameter counts per top-level group.
  tree = jcd.abstract_params(jcd.CONSISTENCY_DECODER)
  size = lambda *names: sum(int(np.prod(l.shape)) for n in names for l in jax.tree.leaves(tree[n]))
  assert size("conv_in") == 20_480
  assert size("time_proj") == 327_680
  assert size("time_embedding") == 2_050_560
  assert [size(f"down_blocks_{i}") for i in range(4)] == [10_659_840, 34_426_880, 83_132_672,
                                                          64_512_000]
  assert size("mid_block") == 43_008_000
  assert [size(f"up_blocks_{i}") for i in range(4)] == [153_669_632, 149_736_704, 63_521_408,
                                                        16_193_920]
  assert size("conv_norm_out", "conv_out") == 17_926


def test_param_tree_reads_like_the_reference():
  tree = jcd.abstract_params(jcd.CONSISTENCY_DECODER)
  for path in [("conv_in", "kernel"), ("time_proj", "embedding"),
               ("time_embedding", "linear_1", "kernel"),
               ("down_blocks_0", "resnets_0", "norm1", "scale"),
               ("down_blocks_0", "resnets_0", "conv1", "kernel"),
               ("down_blocks_0", "resnets_0", "time_emb_proj", "kernel"),
               ("down_blocks_1", "resnets_0", "conv_shortcut", "kernel"),
               ("down_blocks_0", "downsamplers_0", "conv1", "kernel"),
               ("mid_block", "resnets_1", "conv2", "bias"),
               ("up_blocks_2", "upsamplers_0", "norm2", "bias"),
               ("conv_norm_out", "scale"), ("conv_out", "kernel")]:
    node = tree
    for p in path:
      node = node[p]


def test_every_diffusers_key_maps_onto_the_tree_and_back():
  with torch.device("meta"):  # names and shapes only, no 2.5 GB allocation
    ref = UNet2DModel(**unet2d_kwargs(jcd.CONSISTENCY_DECODER))
  flat = {tuple(k.split("/")): v for k, v in _flat_abstract(jcd.CONSISTENCY_DECODER).items()}
  seen = set()
  for key, tensor in ref.state_dict().items():
    path, kind = jcd.torch_key_to_path(key)
    assert jcd.torch_key_to_path("decoder_unet." + key) == (path, kind)
    assert path_to_torch_key(path) == key
    converted = torch_to_flax_layout(np.empty(tensor.shape, np.float32), kind, path[-1])
    assert converted.shape == flat[path].shape, key
    seen.add(path)
  assert seen == set(flat)


def _flat_abstract(cfg):
  import flax
  return {"/".join(k): v for k, v in
          flax.traverse_util.flatten_dict(jcd.abstract_params(cfg)).items()}


def test_layout_conversion_is_oihw_to_hwio_and_transpose():
  conv = np.arange(2 * 3 * 5 * 7, dtype=np.float32).reshape(2, 3, 5, 7)  # O I H W
  hwio = torch_to_flax_layout(conv, "conv", "kernel")
  assert hwio.shape == (5, 7, 3, 2) and hwio[4, 6, 2, 1] == conv[1, 2, 4, 6]
  lin = np.arange(6, dtype=np.float32).reshape(2, 3)
  assert np.array_equal(torch_to_flax_layout(lin, "dense", "kernel"), lin.T)
  assert torch_to_flax_layout(conv, "conv", "bias") is conv


def test_params_from_torch_accepts_prefix_and_any_float_dtype():
  sd = state_dict_numpy(diffusers_unet(jcd.TINY, seed=5))
  plain = jcd.params_from_torch(sd, jcd.TINY)
  half = jcd.params_from_torch({"decoder_unet." + k: v.astype(np.float16) for k, v in sd.items()},
                               jcd.TINY)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(half)):
    assert a.dtype == b.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)
  bf16 = jcd.params_from_torch(sd, jcd.TINY.replace(param_dtype="bfloat16"))
  assert all(l.dtype == jax.numpy.bfloat16 for l in jax.tree.leaves(bf16))


def test_params_from_torch_lists_every_problem_in_one_error():
  sd = state_dict_numpy(diffusers_unet(jcd.TINY, seed=6))
  del sd["conv_in.weight"], sd["mid_block.resnets.1.norm2.bias"]
  sd["encoder.conv_in.weight"] = np.zeros((3,), np.float32)
  sd["up_blocks.0.resnets.0.conv1.weight"] = np.zeros((1, 2, 3, 3), np.float32)
  sd["time_proj.weight"] = sd["time_proj.weight"].astype(np.int32)
  sd["conv_out.bias"] = sd["conv_out.bias"]
  sd["decoder_unet.conv_out.bias"] = sd["conv_out.bias"]
  with pytest.raises(jcd.ParamsMismatchError) as e:
    jcd.params_from_torch(sd, jcd.TINY)
  msg = str(e.value)
  for needle in ["2 missing", "conv_in.weight", "mid_block.resnets.1.norm2.bias",
                 "unexpected", "encoder.conv_in.weight", "decoder_unet.conv_out.bias",
                 "shape mismatch", "up_blocks.0.resnets.0.conv1.weight",
                 "not a float dtype", "time_proj.weight: int32"]:
    assert needle in msg, (needle, msg)


def test_params_for_another_config_are_refused_by_decode():
  params = jcd.params_from_torch(state_dict_numpy(diffusers_unet(jcd.TINY, seed=7)), jcd.TINY)
  latents = np.zeros((1, 4, 2, 2), np.float32)
  with pytest.raises(jcd.ParamsMismatchError, match="shape mismatch"):
    jcd.decode(params, latents, 0, config=jcd.TINY.replace(block_out_channels=(32, 64, 64, 128)))
  with pytest.raises(jcd.ParamsMismatchError, match="missing"):
    jcd.decode(params, latents, 0, config=jcd.TINY.replace(layers_per_block=3))


def test_random_params_fit_the_config_without_compiling():
  cfg = jcd.TINY.replace(param_dtype="bfloat16")
  params = jcd.random_params(cfg, seed=1)
  jcd.check_params(params, cfg)
  leaves = jax.tree.leaves(params)
  assert {str(x.dtype) for x in leaves} == {"bfloat16"}
  kernel = np.asarray(params["conv_in"]["kernel"], np.float32)
  fan_in = np.prod(kernel.shape[:-1])
  assert abs(kernel.std() * np.sqrt(fan_in) - 1) < 0.1  # N(0, 1/fan_in)
  again = jcd.random_params(cfg, seed=1)
  assert all(np.array_equal(a, b) for a, b in zip(leaves, jax.tree.leaves(again)))
