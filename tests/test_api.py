"""The fused classes are drop-ins: same config, persistence, public state and helpers."""

from __future__ import annotations

import pytest
import torch

from drivers import PAIRS


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_is_a_subclass_with_the_same_config(kind):
    reference_cls, fused_cls = PAIRS[kind]
    assert issubclass(fused_cls, reference_cls)
    assert dict(fused_cls().config) == dict(reference_cls().config)
    assert fused_cls.order == reference_cls.order
    assert fused_cls._compatibles == reference_cls._compatibles


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_from_config_and_pretrained_round_trips(kind, tmp_path):
    reference_cls, fused_cls = PAIRS[kind]
    reference = reference_cls(prediction_type="v_prediction", timestep_spacing="trailing")
    fused = fused_cls.from_config(reference.config)
    assert isinstance(fused, fused_cls)
    assert fused.config.prediction_type == "v_prediction"
    fused.save_pretrained(tmp_path)
    again = fused_cls.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(again.config) == public(fused.config)
    assert isinstance(reference_cls.from_pretrained(tmp_path), reference_cls)  # and back


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_public_state_after_set_timesteps(kind):
    reference_cls, fused_cls = PAIRS[kind]
    reference, fused = reference_cls(), fused_cls()
    assert torch.equal(reference.timesteps, fused.timesteps)  # before set_timesteps too
    reference.set_timesteps(13)
    fused.set_timesteps(13)
    assert torch.equal(reference.timesteps, fused.timesteps)
    assert fused.num_inference_steps == reference.num_inference_steps
    assert fused.init_noise_sigma == reference.init_noise_sigma
    assert len(fused) == len(reference)
    for name in ("sigmas", "alphas_cumprod"):
        if hasattr(reference, name):
            assert torch.equal(getattr(reference, name), getattr(fused, name))
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(fused.scale_model_input(x, fused.timesteps[0]), x)


def test_dpm_state_advances_like_diffusers():
    reference_cls, fused_cls = PAIRS["dpm"]
    reference, fused = reference_cls(solver_order=3), fused_cls(solver_order=3)
    for s in (reference, fused):
        s.set_timesteps(8)
        s.set_begin_index(0)
    x = torch.randn(2, 4, 8, 8)
    for t in reference.timesteps:
        m = torch.tanh(x)
        reference.step(m, t, x)
        x = fused.step(m, t, x).prev_sample
        assert fused.step_index == reference.step_index
        assert fused.lower_order_nums == reference.lower_order_nums
        assert fused.begin_index == reference.begin_index
        assert [o is None for o in fused.model_outputs] == [o is None for o in reference.model_outputs]


@pytest.mark.parametrize("kind", ["ddim", "cogvideox_ddim", "cogvideox_dpm", "dpm"])
def test_add_noise_matches_diffusers(kind):
    reference_cls, fused_cls = PAIRS[kind]
    reference, fused = reference_cls(), fused_cls()
    for s in (reference, fused):
        s.set_timesteps(10)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = reference.timesteps[[1, 4, 7]]
    assert torch.equal(fused.add_noise(x0, noise, t), reference.add_noise(x0, noise, t))


@pytest.mark.parametrize("kind", ["ddim", "cogvideox_ddim", "cogvideox_dpm"])
def test_get_velocity_matches_diffusers_without_moving_tables(kind):
    reference_cls, fused_cls = PAIRS[kind]
    reference, fused = reference_cls(), fused_cls()
    x, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    tables_before = fused.alphas_cumprod
    assert torch.equal(fused.get_velocity(x, noise, t), reference.get_velocity(x, noise, t))
    assert fused.alphas_cumprod is tables_before


def test_ddim_inverse_has_no_add_noise_like_diffusers():
    reference_cls, fused_cls = PAIRS["ddim_inverse"]
    assert hasattr(fused_cls, "add_noise") == hasattr(reference_cls, "add_noise")


@pytest.mark.parametrize("kind", ["ddim", "cogvideox_ddim", "ddim_inverse"])
def test_return_types_match(kind):
    reference_cls, fused_cls = PAIRS[kind]
    reference, fused = reference_cls(), fused_cls()
    for s in (reference, fused):
        s.set_timesteps(10)
    x = torch.randn(1, 4, 8, 8)
    t = reference.timesteps[2]
    assert type(fused.step(x, t, x)).__name__ == type(reference.step(x, t, x)).__name__
    assert isinstance(fused.step(x, t, x, return_dict=False), tuple)


def test_cogvideox_dpm_first_order_returns_a_tuple_like_diffusers():
    reference_cls, fused_cls = PAIRS["cogvideox_dpm"]
    fused = fused_cls()
    fused.set_timesteps(10)
    x = torch.randn(1, 4, 8, 8)
    out = fused.step(x, None, fused.timesteps[0], None, x, return_dict=True)
    assert isinstance(out, tuple) and len(out) == 2
