"""The small Vision Transformers the command line names as presets, registered with timm's model registry.

``import hiap`` registers them, so ``timm.create_model("hiap_digits_vit")`` builds one like any timm model: a
``VisionTransformer`` whose ``pretrained_cfg`` says what data it reads (input size, mean, std, interpolation, crop,
classes), so that ``timm.data.resolve_data_config({}, model=model)`` and ``timm.data.create_transform`` prepare its
inputs. None has pretrained weights. The ``hiap_`` prefix keeps the names apart from timm's own; ``hiap prune --model``
takes them with or without it.

    hiap_digits_vit        4 blocks, 64 wide, 4 heads; 1 x 16 x 16 inputs (scikit-learn's 8 x 8 digits upsampled),
                           patches of 4: 16 tokens and the class token
    hiap_mnist1d_vit       the same blocks on MNIST-1D: a 40-sample signal read as a 1 x 1 x 40 image, patches of 1 x 4
    hiap_paper_table3_vit  the HiAP paper's Table 3 setting: a 6-block ViT-Tiny (192 wide, 3 heads) on 32 px CIFAR-10
                           with 4 px patches
"""

from __future__ import annotations

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from hiap.method.architecture import data_pretrained_cfg, set_pretrained_cfg

PREFIX = "hiap_"

# The constructor arguments of each preset (the rest are VisionTransformer's defaults, those of ViT-Tiny's blocks:
# MLP ratio 4, qkv bias, class token, LayerNorm); the input size and classes come from its pretrained_cfg.
PRESET_ARGS = {
    "hiap_digits_vit": dict(patch_size=4, embed_dim=64, depth=4, num_heads=4),
    "hiap_mnist1d_vit": dict(patch_size=(1, 4), embed_dim=64, depth=4, num_heads=4),
    "hiap_paper_table3_vit": dict(patch_size=4, embed_dim=192, depth=6, num_heads=3),
}


def _cfg(input_size: tuple[int, int, int], mean: tuple[float, ...], std: tuple[float, ...], interpolation: str,
         crop_pct: float, num_classes: int = 10) -> dict:
    return {"url": "", "input_size": input_size, "fixed_input_size": True, "mean": mean, "std": std,
            "interpolation": interpolation, "crop_pct": crop_pct, "crop_mode": "center", "num_classes": num_classes,
            "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0"}


# What each preset's data pipeline feeds it. The digits: pixels in [0, 1] resized bilinearly to 16 x 16 (no crop),
# normalised with mean 0.5, std 0.5. MNIST-1D: the generator's standardised signal as it is (mean 0, std 1).
# Table 3: CIFAR-10 images through timm's transforms with ViT-Tiny's normalisation, interpolation and crop.
default_cfgs = generate_default_cfgs({
    "hiap_digits_vit": _cfg((1, 16, 16), (0.5,), (0.5,), "bilinear", 1.0),
    "hiap_mnist1d_vit": _cfg((1, 1, 40), (0.0,), (1.0,), "bilinear", 1.0),
    "hiap_paper_table3_vit": _cfg((3, 32, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 0.9),
})


def _create(variant: str, pretrained: bool, **kwargs) -> VisionTransformer:
    """The preset ``variant`` with ``kwargs`` over its arguments; its pretrained_cfg made true to what was built (an
    ``img_size``, ``in_chans`` or ``num_classes`` given here changes the input size and classes it reports)."""
    model = build_model_with_cfg(VisionTransformer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                 **{**PRESET_ARGS[variant], **kwargs})
    set_pretrained_cfg(model, {**model.pretrained_cfg, **data_pretrained_cfg(model)})
    return model


@register_model
def hiap_digits_vit(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The digits preset: 1 x 16 x 16 inputs, 4 blocks of width 64 with 4 heads of 16, patches of 4, 10 classes."""
    return _create("hiap_digits_vit", pretrained, **kwargs)


@register_model
def hiap_mnist1d_vit(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The MNIST-1D preset: 1 x 1 x 40 inputs, 4 blocks of width 64 with 4 heads of 16, patches of 1 x 4."""
    return _create("hiap_mnist1d_vit", pretrained, **kwargs)


@register_model
def hiap_paper_table3_vit(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The paper's Table 3 ViT-Tiny: 3 x 32 x 32 inputs, 6 blocks of width 192 with 3 heads of 64, patches of 4."""
    return _create("hiap_paper_table3_vit", pretrained, **kwargs)
