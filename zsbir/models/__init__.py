"""Encoders: every backbone behind one interface (`zsbir.models.encoder.Encoder`)."""
from zsbir.models.encoder import Encoder, EncoderOutput, build_encoder

__all__ = ["Encoder", "EncoderOutput", "build_encoder"]
