"""Tiny random Llama and Qwen2 models with a real BPE tokenizer, built in code for tests.

    model, tokenizer = tiny_model("qwen2", quantized=True)
    path = save_tiny_model(tmp_path / "m", "llama")     # an mlx-lm model directory

The tokenizer is a byte-level BPE trained with `tokenizers` on the sentences below, with
ChatML special tokens and chat template, wrapped as mlx-lm's TokenizerWrapper. Models
have a few layers and a vocabulary of a few hundred tokens: everything runs in seconds.
"""

import functools
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama, qwen2
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper
from mlx_lm.utils import quantize_model, save_config, save_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}"
)
CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Bonjour, voici une idée pour le dîner: une soupe à l'oignon.",
    "Hola, ¿cómo estás? Estoy bien, gracias.",
    "Please answer in lowercase and keep it under fifty words.",
    "My cat Luna likes to sleep on the sofa in Berlin.",
    "Here are three tips: 1. drink water 2. sleep well 3. walk daily.",
    "Natalia sold 48 clips in April and half as many in May. How many in total? The answer is 72.",
    "Which gas do plants absorb? A. oxygen B. carbon dioxide C. helium D. neon. The answer is: B",
    "I work as a nurse and I live in Lisbon with my dog Max.",
    "Write a short poem about the sea, the sun and the sand.",
    "Always start with 'Hello friend' and end with 'Cheers!'.",
    "Never use commas. Use bullet points for lists.",
] * 4
VOCAB_SIZE = 384


@functools.lru_cache(maxsize=1)
def tiny_hf_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None,
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"], clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_tokenizer() -> TokenizerWrapper:
    return TokenizerWrapper(tiny_hf_tokenizer(), BPEStreamingDetokenizer)


def tiny_config(arch: str = "llama") -> dict:
    vocab = len(tiny_hf_tokenizer())
    return {
        "model_type": arch,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": vocab,
        "max_position_embeddings": 512,
        # Qwen2's small models tie embeddings; these Llama-likes do not.
        "tie_word_embeddings": arch == "qwen2",
        "eos_token_id": [tiny_hf_tokenizer().eos_token_id],
    }


def tiny_model(arch: str = "llama", quantized: bool = False, seed: int = 0) -> tuple[nn.Module, TokenizerWrapper]:
    model, _ = tiny_model_and_config(arch, quantized, seed)
    return model, tiny_tokenizer()


def tiny_model_and_config(arch: str = "llama", quantized: bool = False, seed: int = 0) -> tuple[nn.Module, dict]:
    config = tiny_config(arch)
    module = {"llama": llama, "qwen2": qwen2}[arch]
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    # Larger than default init so that the random model's distributions are far from uniform.
    model.update(
        {"model": {"embed_tokens": {"weight": mx.random.normal(model.model.embed_tokens.weight.shape) * 0.5}}}
    )
    if quantized:
        model, config = quantize_model(model, config, group_size=32, bits=4)
    mx.eval(model.parameters())
    model.eval()
    return model, config


def save_tiny_model(path: str | Path, arch: str = "llama", quantized: bool = False, seed: int = 0) -> Path:
    """Write a tiny model as an mlx-lm model directory that `mlx_lm.load` reads."""
    path = Path(path)
    model, config = tiny_model_and_config(arch, quantized, seed)
    save_model(path, model)
    save_config(dict(config), path / "config.json")
    tiny_hf_tokenizer().save_pretrained(path)
    return path
