"""Writes the bundled data sets from the tables below; the JSONL files are its output.

    python mipo_mlx/bundled/build.py

- personalization/{train,test}.jsonl: {"id", "prompt", "context", "profile_id",
  "preferences"}; 48 user profiles with checkable preferences (mipo_mlx/preferences.py)
  and 64 everyday questions, split by profile AND by question (test profiles and test
  questions never appear in train).
- personalization2/{train,test}.jsonl: a second personalization set built the same way that
  shares nothing with the first: 48 other profiles (other names, jobs, cities, hobbies),
  other preference KINDS (sentence limits, emoji, bold, exclamation marks, a closing
  question, a greeting by name, a quoted tip, a signature word, the user's name) and 64
  questions on other topics (how things work, money, work, travel, science); split by
  profile and question like the first. A default tuned on the first set meets kinds here
  that it was never tuned on.
- math/{train,test}.jsonl: grade-school word problems in GSM8K's layout, answers computed
  (140 train, 60 test).
- mc/{train,test}.jsonl: multiple-choice questions in ARC's layout.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
NAMES = ["Ana", "Ben", "Chloe", "David", "Emma", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kenji", "Lea",
         "Marco", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Samir", "Tara", "Ugo", "Vera", "Wen", "Yara"]
CITIES = ["Lisbon", "Berlin", "Lyon", "Madrid", "Turin", "Porto", "Munich", "Seville", "Naples", "Toronto", "Osaka", "Dublin"]
PETS = [("cat", "Luna"), ("dog", "Max"), ("parrot", "Kiwi"), ("rabbit", "Coco"), ("dog", "Bruno"), ("cat", "Mochi")]
JOBS = ["nurse", "teacher", "carpenter", "software developer", "chef", "student", "librarian", "farmer"]
LANGUAGE_NAMES = {"fr": "French", "es": "Spanish", "de": "German", "it": "Italian", "pt": "Portuguese"}
STYLES = [
    ("language", "fr"), ("case", "lower"), ("max_words", 40), ("list_format", "bullets"), ("language", "es"),
    ("case", "upper"), ("list_format", "numbered"), ("language", "de"), ("max_words", 60), ("list_format", "none"),
    ("language", "it"), ("language", "pt"),
]
FRAMES = [("opening", "Hello friend"), ("closing", "Cheers!"), ("opening", "Good question"), ("closing", "Hope this helps"),
          ("opening", "Sure thing"), ("closing", "Take care")]
AVOIDS = [",", "meat", "coffee", "car", "sugar", "phone"]
QUESTIONS = [
    "What should I cook for dinner tonight?", "How can I sleep better?", "What is a good way to start the morning?",
    "Can you suggest a weekend activity?", "How do I stay motivated to exercise?", "What should I read next?",
    "How can I save money on groceries?", "Give me an idea for a birthday gift.", "How do I keep my plants alive?",
    "What is a good hobby to pick up?", "How can I be more productive at work?", "What should I pack for a day trip?",
    "How do I make a good cup of tea?", "Suggest a quick healthy snack.", "How can I learn a new language faster?",
    "What is a fun thing to do on a rainy day?", "How do I organise my week?", "How can I reduce stress?",
    "What should I do with leftover rice?", "How do I start running?", "What is a nice way to thank a friend?",
    "How can I make my home cozier?", "What should I write in a postcard?", "How do I clean a cast iron pan?",
    "What game can I play with friends tonight?", "How do I prepare for a job interview?", "What can I bake this weekend?",
    "How can I drink more water every day?", "What is a good stretching routine?", "How do I plan a picnic?",
    "How can I spend less time on my screen?", "What is a good breakfast before a long walk?", "How do I fix a squeaky door?",
    "What should I plant on my balcony?", "How can I make new friends in my city?", "What is an easy soup recipe?",
    "How do I keep my bike in good shape?", "What music should I listen to while working?", "How can I remember names better?",
    "What should I do on a lazy Sunday?", "How do I write a short poem?", "What is a good way to learn to draw?",
    "How can I make a small kitchen tidier?", "What is a good present for a child?", "How do I take better photos with my phone?",
    "How can I keep warm in winter without heating?", "What should I eat after a workout?", "How do I start journaling?",
    # Test questions: never seen in training.
    "How can I make a rainy weekend feel special?", "What is a simple dessert for guests?", "How do I calm down before an exam?",
    "What should I do on my first day in a new town?", "How can I keep my desk clean?", "What is a good evening routine?",
    "How do I choose a good book for a long flight?", "What is an easy way to eat more vegetables?",
    "How can I make a long train ride fun?", "What should I bring to a dinner party?", "How do I care for a new puppy?",
    "What is a cheap date idea?", "How can I wake up earlier?", "What is a good lunch to take to work?",
    "How do I get better at cooking?", "What can I do to relax after work?",
]
TRAIN_QUESTIONS, TEST_QUESTIONS = QUESTIONS[:48], QUESTIONS[48:]
N_PROFILES, N_TEST_PROFILES = 48, 12


def style_text(kind, value):
    return {
        "language": lambda: f"Please always answer me in {LANGUAGE_NAMES.get(value, value)}.",
        "case": lambda: f"I like answers written entirely in {'lowercase' if value == 'lower' else 'UPPERCASE'} letters.",
        "max_words": lambda: f"Keep every answer under {value} words.",
        "list_format": lambda: {"bullets": "When you list things, use bullet points.",
                                "numbered": "When you list things, use a numbered list.",
                                "none": "Please never use lists, write plain sentences."}[value],
        "opening": lambda: f"Start every answer with '{value}'.",
        "closing": lambda: f"End every answer with '{value}'.",
        "mention": lambda: f"Mention {value} in your answer when you can.",
        "avoid": lambda: "Never use commas." if value == "," else f"Never mention {value}.",
    }[kind]()


def profiles():
    rng = random.Random(7)
    result = []
    for i in range(N_PROFILES):
        name, city, (pet, pet_name), job = NAMES[i % len(NAMES)], CITIES[i % len(CITIES)], PETS[i % len(PETS)], JOBS[i % len(JOBS)]
        style = STYLES[i % len(STYLES)]
        frame = FRAMES[(i // 2) % len(FRAMES)]
        personal = ("mention", [city, pet_name][i % 2]) if i % 3 else ("avoid", AVOIDS[(i // 3) % len(AVOIDS)])
        preferences = [{"kind": k, "value": v, "text": style_text(k, v)} for k, v in (style, frame, personal)]
        facts = f"I'm {name}, a {job} living in {city} with my {pet} {pet_name}."
        rules = " ".join(p["text"] for p in preferences)
        result.append({"profile_id": f"u{i:02d}", "context": f"{facts} {rules}", "preferences": preferences})
    rng.shuffle(result)
    return result[N_TEST_PROFILES:], result[:N_TEST_PROFILES]


def personalization(split_profiles, questions, per_profile, seed):
    rng = random.Random(seed)
    rows = []
    for profile in sorted(split_profiles, key=lambda p: p["profile_id"]):
        for question in rng.sample(questions, per_profile):
            q = questions.index(question)
            rows.append({"id": f"{profile['profile_id']}-q{q:02d}", "prompt": question, **profile})
    rng.shuffle(rows)
    return rows


# The second personalization set: nothing in common with the first (names, places, kinds, questions).
NAMES2 = ["Aiko", "Bruno", "Carmen", "Dmitri", "Elif", "Felix", "Gaia", "Hamid", "Iris", "Joaquin", "Kaja", "Luca",
          "Mei", "Nikos", "Olga", "Pablo", "Rania", "Stefan", "Tomas", "Ursula", "Viktor", "Wanda", "Xavier", "Zofia"]
CITIES2 = ["Krakow", "Athens", "Bergen", "Valencia", "Utrecht", "Ghent", "Bologna", "Tallinn", "Vienna", "Zagreb",
           "Lausanne", "Cork"]
HOBBIES = ["chess", "pottery", "sailing", "birdwatching", "rock climbing", "knitting", "astronomy", "jazz piano"]
JOBS2 = ["pharmacist", "electrician", "architect", "bus driver", "accountant", "physiotherapist", "journalist", "baker"]
STYLES2 = [("max_sentences", 2), ("emoji", "any"), ("bold", "any"), ("no_exclamation", "!"), ("max_sentences", 3),
           ("emoji", "any"), ("bold", "any"), ("max_sentences", 2)]
FRAMES2 = ["end_question", "greet_name", "quote"]
SIGNATURE_WORDS = ["wonderful", "indeed", "splendid", "basically", "truly", "certainly"]
QUESTIONS2 = [
    "How does a refrigerator keep food cold?", "What is inflation?", "How do I write a polite email to my boss?",
    "Why do leaves change colour in autumn?", "How can I pay off a credit card faster?", "What is a black hole?",
    "How do I prepare for a long flight?", "Why is the sea salty?", "How do vaccines work?",
    "What should I look for when renting a flat?", "How does a bicycle gear work?", "What is compound interest?",
    "How do I ask for a raise?", "Why do we have seasons?", "How can I back up the photos on my phone?",
    "What is the difference between weather and climate?", "How do I pick a good password?",
    "How do airplanes stay in the air?", "What should I do if I miss a train connection?", "How do solar panels work?",
    "How can I give useful feedback to a colleague?", "What is a budget and how do I make one?",
    "Why does bread go stale?", "How do I choose a good travel backpack?", "What causes thunder?",
    "How can I run a good meeting?", "What is a mortgage?", "How does the internet send a message across the world?",
    "How do I learn to touch type?", "Why do cats purr?", "What should I know before buying a used car?",
    "How do magnets work?", "How can I negotiate a lower rent?", "What is a healthy amount of sleep?",
    "How do I get over jet lag?", "Why is the sky dark at night?", "How do I write a good cover letter?",
    "What is an index fund?", "How does a microwave heat food?", "How can I keep my email inbox under control?",
    "What is the water cycle?", "How do I plan a budget trip to the mountains?", "Why do onions make us cry?",
    "How do noise cancelling headphones work?", "How can I say no to extra work politely?",
    "What is a credit score?", "How do bees make honey?", "How do I find cheap train tickets?",
    # Test questions: never seen in training.
    "How does a heat pump work?", "What is a pension and why does it matter?", "How do I prepare for a presentation?",
    "Why do we get goosebumps?", "How can I avoid roaming charges abroad?", "What is an earthquake?",
    "How do I split bills fairly with flatmates?", "How does GPS know where I am?", "What should I do on a long layover?",
    "Why does ice float?", "How can I ask a colleague for help?", "What is a savings account for?",
    "How do rainbows form?", "How do I keep my laptop battery healthy?", "What is a good way to learn about wine?",
    "How can I travel with only a carry-on bag?",
]
TRAIN_QUESTIONS2, TEST_QUESTIONS2 = QUESTIONS2[:48], QUESTIONS2[48:]
N_PROFILES2, N_TEST_PROFILES2 = 48, 14


def style_text2(kind, value):
    return {
        "max_sentences": lambda: f"Answer in at most {value} sentences.",
        "emoji": lambda: "Use at least one emoji in every answer.",
        "bold": lambda: "Put the most important words in **bold**.",
        "no_exclamation": lambda: "Never use exclamation marks.",
        "end_question": lambda: "Always end your answer with a question for me.",
        "greet_name": lambda: f"Begin every answer by greeting me by name, like 'Hi {value},'.",
        "quote": lambda: "Put your single most important tip in double quotes.",
        "signature_word": lambda: f"Use the word '{value}' at least once.",
        "address_name": lambda: f"Call me {value} somewhere in the answer.",
    }[kind]()


def profiles2():
    rng = random.Random(11)
    result = []
    for i in range(N_PROFILES2):
        name, city, hobby, job = NAMES2[i % len(NAMES2)], CITIES2[i % len(CITIES2)], HOBBIES[i % len(HOBBIES)], JOBS2[i % len(JOBS2)]
        style = STYLES2[i % len(STYLES2)]
        frame_kind = FRAMES2[(i // 2) % len(FRAMES2)]
        frame = (frame_kind, name if frame_kind == "greet_name" else {"end_question": "?", "quote": '"'}[frame_kind])
        # A greeting already uses the name: those profiles get a signature word instead.
        personal = (("signature_word", SIGNATURE_WORDS[(i // 3) % len(SIGNATURE_WORDS)])
                    if frame_kind == "greet_name" or i % 2 else ("address_name", name))
        preferences = [{"kind": k, "value": v, "text": style_text2(k, v)} for k, v in (style, frame, personal)]
        article = "an" if job[0] in "aeiou" else "a"
        facts = f"I'm {name}, {article} {job} from {city}, and I love {hobby}."
        rules = " ".join(p["text"] for p in preferences)
        result.append({"profile_id": f"v{i:02d}", "context": f"{facts} {rules}", "preferences": preferences})
    rng.shuffle(result)
    return result[N_TEST_PROFILES2:], result[:N_TEST_PROFILES2]


def math_problems(count, seed):
    rng = random.Random(seed)
    templates = [
        ("{a} apples are in a basket. {n} friends each take {b}. How many apples are left?", lambda a, b, n: a - b * n),
        ("A book costs {a} dollars and a pen costs {b} dollars. How much do {n} books and one pen cost?", lambda a, b, n: a * n + b),
        ("Sam reads {a} pages a day for {n} days, then {b} more pages. How many pages did Sam read?", lambda a, b, n: a * n + b),
        ("A train has {n} cars with {a} seats each. {b} seats are taken. How many seats are free?", lambda a, b, n: a * n - b),
        ("Mia saves {a} dollars a week for {n} weeks and spends {b} dollars. How much is left?", lambda a, b, n: a * n - b),
    ]
    rows = []
    for i in range(count):
        text, solve = templates[i % len(templates)]
        n = rng.randint(2, 6)
        a = rng.randint(12, 40)
        b = rng.randint(1, a - 1) if i % len(templates) == 0 else rng.randint(1, 11)
        if i % len(templates) == 0:
            a = b * n + rng.randint(1, 20)
        answer = solve(a, b, n)
        rows.append({"id": f"math-{i:03d}", "question": text.format(a=a, b=b, n=n),
                     "answer": f"The result is {answer}.\n#### {answer}"})
    return rows


MC = [
    ("Which gas do plants take in from the air?", ["oxygen", "carbon dioxide", "helium", "neon"], "B"),
    ("What is the boiling point of water at sea level?", ["50 °C", "75 °C", "100 °C", "150 °C"], "C"),
    ("Which planet is closest to the Sun?", ["Mercury", "Venus", "Earth", "Mars"], "A"),
    ("What part of the plant makes food using sunlight?", ["root", "stem", "leaf", "flower"], "C"),
    ("Which of these is a mammal?", ["shark", "whale", "trout", "octopus"], "B"),
    ("What force pulls objects toward the Earth?", ["magnetism", "friction", "gravity", "tension"], "C"),
    ("Which state of matter has a fixed shape?", ["solid", "liquid", "gas", "plasma"], "A"),
    ("How many legs does an insect have?", ["four", "six", "eight", "ten"], "B"),
    ("What do bees collect from flowers?", ["sand", "nectar", "salt", "oil"], "B"),
    ("Which of these is a renewable energy source?", ["coal", "oil", "wind", "natural gas"], "C"),
    ("What is frozen water called?", ["steam", "ice", "fog", "dew"], "B"),
    ("Which organ pumps blood through the body?", ["lungs", "liver", "heart", "kidney"], "C"),
    ("What does a thermometer measure?", ["weight", "temperature", "length", "speed"], "B"),
    ("Which animal lays eggs?", ["cow", "chicken", "horse", "dog"], "B"),
    ("What causes day and night on Earth?", ["the Moon's orbit", "Earth's rotation", "the Sun's movement", "clouds"], "B"),
    ("Which tool is best for seeing tiny cells?", ["telescope", "microscope", "ruler", "compass"], "B"),
    ("What is the main source of light for the Earth?", ["the Moon", "the Sun", "stars", "volcanoes"], "B"),
    ("Which material conducts electricity best?", ["wood", "rubber", "copper", "glass"], "C"),
    ("What do caterpillars turn into?", ["bees", "butterflies", "beetles", "spiders"], "B"),
    ("Which season follows winter?", ["summer", "autumn", "spring", "monsoon"], "C"),
    ("What do we call animals that eat only plants?", ["carnivores", "herbivores", "omnivores", "predators"], "B"),
    ("Which of these is a liquid at room temperature?", ["iron", "water", "salt", "wood"], "B"),
    ("What protects the Earth from harmful sun rays?", ["the ozone layer", "the crust", "the core", "oceans"], "A"),
    ("Which sense do we use our nose for?", ["sight", "hearing", "smell", "touch"], "C"),
]


def multiple_choice():
    return [{"id": f"mc-{i:03d}", "question": {"stem": stem, "choices": [{"label": l, "text": t} for l, t in zip("ABCD", choices)]},
             "answerKey": key} for i, (stem, choices, key) in enumerate(MC)]


def write(name, rows):
    path = HERE / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main():
    train_profiles, test_profiles = profiles()
    write("personalization/train", personalization(train_profiles, TRAIN_QUESTIONS, 4, seed=1))
    write("personalization/test", personalization(test_profiles, TEST_QUESTIONS, 4, seed=2))
    train_profiles2, test_profiles2 = profiles2()
    write("personalization2/train", personalization(train_profiles2, TRAIN_QUESTIONS2, 4, seed=4))
    write("personalization2/test", personalization(test_profiles2, TEST_QUESTIONS2, 6, seed=5))
    # The first 60 problems were the whole set once; later ones are appended so that earlier ids keep their split.
    math = math_problems(200, seed=3)
    write("math/train", math[:40] + math[60:160])
    write("math/test", math[40:60] + math[160:])
    mc = multiple_choice()
    write("mc/train", mc[:16])
    write("mc/test", mc[16:])


if __name__ == "__main__":
    main()
