"""Chat rendering shared by sampling, training and evaluation.

Every stage turns (messages, answer) into token ids the same way, so that the reference
log-probs stored at sampling time are exactly what the trainer recomputes:

    prompt_ids = encode_prompt(tokenizer, messages)             # ends with the assistant header
    ids, answer_start = encode_answer(tokenizer, messages, answer)
    # ids[:answer_start] == prompt_ids; ids[answer_start:] is the answer and its end-of-turn

A chat template whose rendering of the prompt is not a prefix of its rendering of the
prompt plus answer (some "thinking" templates) cannot be scored this way: UserError.
"""

from mipo_mlx.errors import UserError


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the chat prompt, ending with the assistant's generation header."""
    if not tokenizer.has_chat_template:
        raise UserError("the model's tokenizer has no chat template; use an instruct model", key="model.path")
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def encode_answer(tokenizer, messages: list[dict], answer: str) -> tuple[list[int], int]:
    """Token ids of prompt plus answer (with the template's end of turn), and where the answer starts."""
    prompt = encode_prompt(tokenizer, messages)
    full = list(
        tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": answer}], add_generation_prompt=False, tokenize=True
        )
    )
    if full[: len(prompt)] != prompt:
        raise UserError(
            "the chat template renders the prompt differently once an answer follows, so answers "
            "cannot be scored apart from their prompt; use a model whose template keeps the prompt as a prefix",
            key="model.path",
        )
    return full, len(prompt)
