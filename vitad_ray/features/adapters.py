"""One adapter per backbone family, in the style of timm's model entrypoints: how a family's
network is built (pretrained or random from its config), cut after a block, and read out as
tokens. Everything that differs between families lives here; ``Backbone`` does the rest
(normalisation, precision, tracing, the global vector and the patch grid) the same way for all.
"""

from __future__ import annotations

from pathlib import Path

_ADAPTERS: dict[str, "BackboneAdapter"] = {}


def register_adapter(*families: str):
    def add(cls):
        for family in families:
            _ADAPTERS[family] = cls()
        return cls
    return add


def adapter_for(family: str) -> "BackboneAdapter":
    try:
        return _ADAPTERS[family]
    except KeyError:
        raise ValueError(f"no adapter for backbone family {family!r}; "
                         f"known: {sorted(_ADAPTERS)}") from None


class BackboneAdapter:
    """The interface; a family implements every method."""

    def hub_repo(self, ref: str) -> str:
        """The hub repository that holds ``ref``'s weights."""
        return ref

    def build(self, spec, local: str | None, seed: int):
        """The network: weights from the folder ``local``, or random (from ``seed``) after the
        spec's ``random_config`` when ``local`` is None."""
        raise NotImplementedError

    def keep_blocks(self, model, deepest: int) -> None:
        """Drops the blocks after block ``deepest`` (1-based)."""
        raise NotImplementedError

    def depth(self, model) -> int:
        raise NotImplementedError

    def width(self, model) -> int:
        raise NotImplementedError

    def prefix_tokens(self, model) -> int:
        """Tokens before the patches (CLS, registers)."""
        raise NotImplementedError

    def tokens(self, model, x, layers: tuple[int, ...]):
        """[B, prefix + patches, width * max(1, len(layers))]: the last block's tokens, or the
        given blocks' (each through the final norm) side by side."""
        raise NotImplementedError


class _TransformersAdapter(BackboneAdapter):
    """A transformers vision model whose blocks sit in ``encoder.layer`` or ``layers``."""

    model_class = config_class = ""
    forward_kwargs: dict = {}

    def build(self, spec, local, seed):
        import torch
        import transformers

        model_cls = getattr(transformers, self.model_class)
        if local is not None:
            return model_cls.from_pretrained(local, dtype=torch.float32)
        torch.manual_seed(seed)
        config = getattr(transformers, self.config_class)(
            image_size=spec.image_size, patch_size=spec.patch_size, **spec.random_config)
        return model_cls(config)

    def keep_blocks(self, model, deepest):
        if hasattr(model, "encoder"):
            model.encoder.layer = model.encoder.layer[:deepest]
        else:
            model.layers = model.layers[:deepest]
        model.config.num_hidden_layers = deepest

    def depth(self, model):
        return int(model.config.num_hidden_layers)

    def width(self, model):
        return int(model.config.hidden_size)

    def prefix_tokens(self, model):
        return 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)

    def tokens(self, model, x, layers):
        out = model(pixel_values=x, output_hidden_states=bool(layers), **self.forward_kwargs)
        if not layers:
            return out.last_hidden_state
        # hidden_states[0] is the patch embedding; hidden_states[i] is block i's output.
        return cat_tokens([model.layernorm(out.hidden_states[i]) for i in layers])


@register_adapter("dinov2")
class Dinov2Adapter(_TransformersAdapter):
    model_class, config_class = "Dinov2Model", "Dinov2Config"


@register_adapter("dinov2-reg")
class Dinov2WithRegistersAdapter(_TransformersAdapter):
    model_class, config_class = "Dinov2WithRegistersModel", "Dinov2WithRegistersConfig"


@register_adapter("ijepa")
class IJepaAdapter(_TransformersAdapter):
    """I-JEPA has no CLS token (the global vector is the patches' mean) and needs its position
    encoding interpolated at other input sizes than its own."""

    model_class, config_class = "IJepaModel", "IJepaConfig"
    forward_kwargs = {"interpolate_pos_encoding": True}

    def prefix_tokens(self, model):
        return 0


@register_adapter("timm-vit")
class TimmViTAdapter(BackboneAdapter):
    """A timm VisionTransformer (the in21k ViTs), built at the spec's input size."""

    def hub_repo(self, ref):
        return ref if "/" in ref else f"timm/{ref}"

    def build(self, spec, local, seed):
        import timm
        import torch

        if local is None:
            torch.manual_seed(seed)
            return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0,
                                     img_size=spec.image_size, patch_size=spec.patch_size,
                                     dynamic_img_size=True, **spec.random_config)
        files = sorted(Path(local).glob("*.safetensors")) or sorted(Path(local).glob("*.bin"))
        return timm.create_model(spec.source, pretrained=True, num_classes=0,
                                 img_size=spec.image_size, dynamic_img_size=True,
                                 pretrained_cfg_overlay={"file": str(files[0])})

    def keep_blocks(self, model, deepest):
        model.blocks = model.blocks[:deepest]

    def depth(self, model):
        return len(model.blocks)

    def width(self, model):
        return int(model.num_features)

    def prefix_tokens(self, model):
        return int(model.num_prefix_tokens)

    def tokens(self, model, x, layers):
        if not layers:
            return model.forward_features(x)
        taken = {}
        hooks = [model.blocks[i - 1].register_forward_hook(
            lambda _m, _in, out, i=i: taken.__setitem__(i, out)) for i in layers]
        try:
            model.forward_features(x)
        finally:
            for h in hooks:
                h.remove()
        return cat_tokens([model.norm(taken[i]) for i in layers])


def cat_tokens(tokens: list):
    import torch

    return tokens[0] if len(tokens) == 1 else torch.cat(tokens, dim=-1)
