"""Stated preferences a program can check, one checker per kind.

    check({"kind": "language", "value": "fr"}, "Bonjour, voici une idée")    # True
    check_all(preferences, answer)        # {"language": True, "max_words": False, ...}

Kinds and values:
| kind        | value                                  | passes when the answer ...                   |
| ----------- | -------------------------------------- | -------------------------------------------- |
| language    | en, fr, es, de, it, pt                 | is mostly in that language (stop words)      |
| case        | lower or upper                         | has no letters of the other case             |
| max_words   | a number                               | has at most that many words                  |
| list_format | bullets, numbered or none              | uses that list style (or none at all)        |
| opening     | a phrase                               | starts with it (case and punctuation aside)  |
| closing     | a phrase                               | ends with it                                 |
| mention     | a word or name                         | contains it                                  |
| avoid       | a word, or "," for no commas           | does not contain it                          |
| max_sentences | a number                             | has at most that many sentences              |
| emoji       | any                                    | has at least one emoji                       |
| bold        | any                                    | has a **bold** span                          |
| no_exclamation | !                                   | has no exclamation mark                      |
| end_question | ?                                     | ends with a question mark                    |
| greet_name  | the user's name                        | opens with a greeting and the name ("Hi Iris,") |
| quote       | "                                      | has a span of two or more words in double quotes |
| signature_word | a word                              | uses that word                               |
| address_name | the user's name                       | uses the name                                |

The first eight kinds are those of bundled:personalization, the others those of
bundled:personalization2 (mipo_mlx/bundled/build.py).
"""

import re

# Frequent function words; a language wins when its words are the most frequent ones.
STOP_WORDS = {
    "en": "the and is are you your to of in it that for with this be on have can i my we not".split(),
    "fr": "le la les et est vous votre une un des du pour avec dans que qui pas je mon sur ce".split(),
    "es": "el la los las y es usted su una un para con en que no por del lo como yo mi".split(),
    "de": "der die das und ist sie ihr ein eine zu mit für nicht ich mein auf den dem es".split(),
    "it": "il la le e è di che per con una un non sono io mio del della si lo gli".split(),
    "pt": "o a os as e é de que para com um uma não em do da eu meu você seu".split(),
}
BULLET = re.compile(r"^\s*[-*•]\s+\S", re.MULTILINE)
NUMBERED = re.compile(r"^\s*\d+[.)]\s+\S", re.MULTILINE)
# A sentence ends at . ! ? (or an ellipsis) followed by a space or the end; list lines count as sentences.
SENTENCE_END = re.compile(r"[.!?…]+(?=\s|$)|\n+")
EMOJI = re.compile("[\U0001F300-\U0001FAFF\U00002600-\U000027BF\U0001F000-\U0001F2FF\U00002B50\U00002B55]")
BOLD = re.compile(r"\*\*[^*\n]*\w[^*\n]*\*\*|__[^_\n]*\w[^_\n]*__")
QUOTED = re.compile(r'["\u201c][^"\u201c\u201d\n]*\w+\s+\w+[^"\u201c\u201d\n]*["\u201d]')
GREETING = ("hi", "hello", "hey", "dear", "good morning", "good evening", "good afternoon", "greetings")


def detect_language(text: str) -> str | None:
    words = re.findall(r"[^\W\d_]+", text.lower())
    if not words:
        return None
    scores = {lang: sum(w in stops for w in words) for lang, stops in STOP_WORDS.items()}
    # Accented letters tell Romance languages apart from English on short answers.
    if re.search(r"[éèêàçù]", text.lower()):
        scores["fr"] += 1
    if re.search(r"[ñ¿¡]", text.lower()):
        scores["es"] += 2
    if re.search(r"[äöüß]", text.lower()):
        scores["de"] += 2
    if re.search(r"[ãõ]", text.lower()):
        scores["pt"] += 2
    best = max(scores, key=scores.get)
    return best if scores[best] > 0 else None


def _normalized(text: str) -> str:
    return re.sub(r"[^\w\s]", "", text.lower()).strip()


def check(preference: dict, answer: str) -> bool:
    kind, value = preference["kind"], preference["value"]
    text = answer.strip()
    if kind == "language":
        return detect_language(text) == value
    if kind == "case":
        letters = [c for c in text if c.isalpha()]
        return bool(letters) and all(c.islower() if value == "lower" else c.isupper() for c in letters if c.lower() != c.upper())
    if kind == "max_words":
        return 0 < len(text.split()) <= int(value)
    if kind == "list_format":
        bullets, numbered = bool(BULLET.search(text)), bool(NUMBERED.search(text))
        return {"bullets": bullets and not numbered, "numbered": numbered and not bullets, "none": not (bullets or numbered)}[value]
    if kind == "opening":
        return _normalized(text).startswith(_normalized(value))
    if kind == "closing":
        return _normalized(text).endswith(_normalized(value))
    if kind == "mention":
        return value.lower() in text.lower()
    if kind == "avoid":
        return value not in text if value == "," else re.search(rf"\b{re.escape(value.lower())}\b", text.lower()) is None
    if kind == "max_sentences":
        return 0 < len([s for s in SENTENCE_END.split(text) if re.search(r"\w", s)]) <= int(value)
    if kind == "emoji":
        return EMOJI.search(text) is not None
    if kind == "bold":
        return BOLD.search(text) is not None
    if kind == "no_exclamation":
        return "!" not in text
    if kind == "end_question":
        return text.rstrip("\"')*_ ").endswith("?")
    if kind == "greet_name":
        opening = _normalized(text)
        return any(opening.startswith(f"{greeting} {value.lower()}") for greeting in GREETING)
    if kind == "quote":
        return QUOTED.search(text) is not None
    if kind in ("signature_word", "address_name"):
        return re.search(rf"\b{re.escape(value.lower())}\b", text.lower()) is not None
    raise ValueError(f"unknown preference kind {kind!r}")


def check_all(preferences: list[dict], answer: str) -> dict[str, bool]:
    """Pass or fail per preference kind (a kind listed twice must pass both)."""
    results: dict[str, bool] = {}
    for preference in preferences:
        results[preference["kind"]] = results.get(preference["kind"], True) and check(preference, answer)
    return results
