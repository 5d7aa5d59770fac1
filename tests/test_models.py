import pytest
import torch

from vae_lab.config import ModelConfig
from vae_lab.models.components import build_model


@pytest.mark.parametrize("name", ["ae", "linear_vae", "conv_ae", "conv_vae"])
@pytest.mark.parametrize("size", [28, 32])
@pytest.mark.parametrize("channels", [1, 3])
def test_every_family_round_trips_shapes(name, size, channels):
    model = build_model(ModelConfig(name=name, latent_dim=6, hidden_dims=[32], conv_channels=[8, 16]),
                        (channels, size, size))
    images = torch.rand(5, channels, size, size)
    output = model(images)
    assert output.logits.shape == images.shape
    assert output.posterior.mean.shape == (5, 6)
    assert model.sample(3).shape == (3, channels, size, size)
    if name.endswith("vae"):
        assert output.posterior.logvar.shape == (5, 6)
        assert not torch.equal(output.z, output.posterior.mean)
    else:
        assert output.posterior.logvar is None
        assert torch.equal(output.z, output.posterior.mean)


def test_seed001_latent_cube_is_4x4x4():
    model = build_model(ModelConfig(name="conv_vae", latent_dim=64, conv_channels=[8, 16, 16],
                                    latent_layout="cube"), (1, 32, 32))
    assert model.latent_cube == (4, 4, 4)
    assert model(torch.rand(2, 1, 32, 32)).logits.shape == (2, 1, 32, 32)


def test_cube_latent_size_must_fit_the_feature_map():
    with pytest.raises(ValueError, match="multiple"):
        build_model(ModelConfig(name="conv_ae", latent_dim=10, conv_channels=[8, 16, 16],
                                latent_layout="cube"), (1, 32, 32))


def test_logvar_is_clamped():
    model = build_model(ModelConfig(name="linear_vae", latent_dim=2, hidden_dims=[8]), (1, 8, 8))
    with torch.no_grad():
        model.encoder[-1].bias.fill_(1e4)
    posterior = model.encode(torch.rand(2, 1, 8, 8))
    assert torch.isfinite(posterior.std).all()
    assert posterior.logvar.max() <= 20.0


def test_seeded_sampling_is_reproducible():
    model = build_model(ModelConfig(name="linear_vae", latent_dim=4, hidden_dims=[16]), (1, 28, 28))
    first = model.sample(4, torch.Generator().manual_seed(1))
    again = model.sample(4, torch.Generator().manual_seed(1))
    other = model.sample(4, torch.Generator().manual_seed(2))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_gated_hidden_layers_compute_value_times_sigmoid_gate():
    from vae_lab.models.autoencoders import GatedDense

    model = build_model(ModelConfig(name="linear_vae", latent_dim=40, hidden_dims=[300, 300], activation="gated"),
                        (1, 28, 28))
    gated = [module for module in model.modules() if isinstance(module, GatedDense)]
    assert len(gated) == 4  # two in the encoder, two in the decoder
    layer, x = gated[0], torch.randn(5, 784)
    expected = layer.value(x) * torch.sigmoid(layer.gate(x))
    assert torch.allclose(layer(x), expected)
    assert model(torch.rand(2, 1, 28, 28)).logits.shape == (2, 1, 28, 28)
    relu = build_model(ModelConfig(name="linear_vae", latent_dim=40, hidden_dims=[300, 300]), (1, 28, 28))
    assert not any(isinstance(module, GatedDense) for module in relu.modules())


@pytest.mark.parametrize("size", [28, 32])
@pytest.mark.parametrize("layout, latent", [("vector", 16), ("cube", 64)])
def test_conv_upsampling_has_even_overlap_and_gives_back_the_input_size(size, layout, latent):
    config = ModelConfig(name="conv_vae", latent_dim=latent, conv_channels=[16, 32, 32], latent_layout=layout)
    model = build_model(config, (1, size, size))
    upsampling = [layer for layer in model.decoder if isinstance(layer, torch.nn.ConvTranspose2d)]
    assert len(upsampling) == 3
    for layer in upsampling:
        assert layer.stride == (2, 2) and all(kernel % 2 == 0 for kernel in layer.kernel_size)
    x = torch.rand(3, 1, size, size)
    assert model.decode(model.encode(x).mean).shape == x.shape


def test_upsampling_leaves_no_checkerboard():
    # a transposed convolution with all-ones weights over an all-ones input: with even overlap every
    # interior output pixel gets the same number of taps; kernel 3 at stride 2 alternates 1 and 2
    model = build_model(ModelConfig(name="conv_ae", latent_dim=16, conv_channels=[4]), (1, 32, 32))
    layer = model.decoder[0]
    with torch.no_grad():
        layer.weight.fill_(1.0)
        out = torch.nn.functional.conv_transpose2d(torch.ones(1, 4, 16, 16), layer.weight, stride=layer.stride,
                                                   padding=layer.padding, output_padding=layer.output_padding)
    interior = out[0, 0, 2:-2, 2:-2]
    assert out.shape[-1] == 32 and torch.all(interior == interior[0, 0])
    uneven = torch.nn.functional.conv_transpose2d(torch.ones(1, 1, 16, 16), torch.ones(1, 1, 3, 3), stride=2,
                                                  padding=1, output_padding=1)[0, 0, 2:-2, 2:-2]
    assert len(uneven.unique()) > 1  # what kernel 3 did
