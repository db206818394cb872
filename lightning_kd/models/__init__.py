"""Networks: small models for the embedded data, the CRD CIFAR models, timm by name, generators, GPT-2."""

from lightning_kd.models.cifar import CIFAR_MODELS, create_cifar_model
from lightning_kd.models.conv2d import ConvNet2d
from lightning_kd.models.generator import ConvGenerator1d, Generator
from lightning_kd.models.gpt import GPT2_SIZES, tiny_gpt2
from lightning_kd.models.layer_embedding import LayerEmbedding
from lightning_kd.models.sentence_encoder import (
    SentenceEncoder,
    minilm_teacher,
    small_bert_encoder,
    student_from_teacher,
)
from lightning_kd.models.small import MLP, ConvNet1d
from lightning_kd.models.timm_bridge import timm_model

__all__ = [
    "CIFAR_MODELS",
    "GPT2_SIZES",
    "MLP",
    "ConvGenerator1d",
    "ConvNet1d",
    "ConvNet2d",
    "Generator",
    "LayerEmbedding",
    "SentenceEncoder",
    "create_cifar_model",
    "minilm_teacher",
    "small_bert_encoder",
    "student_from_teacher",
    "timm_model",
    "tiny_gpt2",
]
