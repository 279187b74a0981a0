"""One image's height sharded over 4 simulated CPU devices equals the unsharded decode."""

import textwrap

from simulated_devices import run_on_simulated_devices

SPATIAL = textwrap.dedent("""
    import jax, numpy as np, jaxconsdec as jcd
    from jaxconsdec import sharded
    jax.config.update("jax_default_matmul_precision", "highest")
    assert jax.device_count() == 4
    cfg = jcd.TINY
    params = jcd.random_params(cfg, 0)
    lat = (np.random.default_rng(0).standard_normal((2, 4, 16, 8)) / 0.18215).astype(np.float32)
    for layout, x in (("NCHW", lat), ("NHWC", lat.transpose(0, 2, 3, 1))):
      got = sharded.decode_spatial(params, x, 3, config=cfg, layout=layout)
      assert len(got.sharding.device_set) == 4 and not got.sharding.is_fully_replicated
      want = np.asarray(jcd.decode(params, x, 3, config=cfg, layout=layout))
      err = np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want)
      assert err <= 1e-5, (layout, err)
      print(layout, "rel err", err)
    # Really partitioned: rows cross devices (halo exchange), GroupNorm statistics all-reduce.
    program = sharded.spatial_program(sharded.data_mesh(axis="space"), "space", cfg,
                                       jcd.timesteps_for((1.0, 0.5)), True, "NCHW")
    hlo = program.lower(sharded.replicate(params, sharded.data_mesh(axis="space")), lat,
                        jcd.example_keys(3, 2)).compile().as_text()
    assert "collective-permute" in hlo and "all-reduce" in hlo
    try:
      sharded.decode_spatial(params, lat[:, :, :6], 3, config=cfg)
    except ValueError as e:
      assert "does not divide over 4 devices" in str(e)
    else:
      raise AssertionError("a height of 6 latent rows over 4 devices was accepted")
    print("OK")
""")


def test_height_sharded_decode_equals_unsharded():
  run_on_simulated_devices(SPATIAL, 4)
