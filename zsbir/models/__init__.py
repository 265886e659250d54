"""Encoders: every backbone behind one interface (`zsbir.models.encoder.Encoder`)."""
from zsbir.models.encoder import Encoder, EncoderOutput, build_encoder
from zsbir.models.weights import MissingWeightsError

__all__ = ["Encoder", "EncoderOutput", "MissingWeightsError", "build_encoder"]
