from .transformer_infinitetalk import AudioProjModel, InfiniteTalkTransformer3DModel

__all__ = ["AudioProjModel", "InfiniteTalkTransformer3DModel"]
