"""Regenerate calibration/prompts.txt (deterministic; run: python calibration/make_prompts.py).

The set is written for sd35trt: hand-picked subjects, settings, styles, compositions and lighting,
combined by a seeded generator into prompts of 3 to 70 words, plus hand-written prompts that ask for
rendered text. Diversity matters for FP8 calibration: activation ranges depend on content, style, and
prompt length (T5 sees up to 256 tokens), so short tags and long descriptive paragraphs are both present.
"""

from __future__ import annotations

import random
from pathlib import Path

SUBJECTS = [
    "an old fisherman mending a net", "a red fox in fresh snow", "a glass teapot with blooming tea",
    "a cyberpunk street vendor", "a lighthouse on a basalt cliff", "two children flying a paper kite",
    "a steam locomotive crossing a viaduct", "a bowl of ramen with a soft egg", "a snow leopard on a ridge",
    "an astronaut tending a greenhouse on Mars", "a violin maker in her workshop", "a koi pond in autumn",
    "a vintage motorcycle in a garage", "a coral reef with a sea turtle", "a medieval market square",
    "a sleeping tabby cat on a windowsill", "a hot air balloon festival", "a desert caravan at dusk",
    "a robot barista pouring latte art", "a wooden sailboat in a storm", "a field of sunflowers",
    "a grandmother baking bread", "a neon-lit noodle bar in the rain", "a barn owl in flight",
    "a Gothic cathedral interior", "a mountain biker on a forest trail", "a bouquet of peonies in a vase",
    "a jazz trio on a small stage", "a polar bear on drifting ice", "a futuristic maglev train station",
    "a stack of pancakes with blueberries", "a lone tree on a hill", "a samurai under cherry blossoms",
    "a chemistry lab with glowing flasks", "a herd of wild horses", "a tiny house in the woods",
    "a ballerina mid-leap", "a chameleon on a branch", "a rainy Tokyo crosswalk", "a mossy stone bridge",
    "a portrait of an elderly man with a white beard", "a vegetable garden at sunrise",
    "a dragon curled around a tower", "a carnival at night", "a hummingbird at a feeder",
    "a potter shaping clay on a wheel", "an abandoned amusement park", "a frozen waterfall",
    "a chess game between two old friends", "a submarine exploring a trench", "a bowl of ripe cherries",
    "a street musician with an accordion", "a bamboo forest path", "a giant tortoise",
    "a desk cluttered with maps and a compass", "a firefighter in heavy smoke", "a crystal cave",
    "a cozy library with a fireplace", "a surfer inside a barrel wave", "a family picnic by a lake",
]
SETTINGS = [
    "at golden hour", "under heavy fog", "in the blue hour", "on a winter morning", "during a thunderstorm",
    "under the northern lights", "at high noon", "by candlelight", "in a sandstorm", "after rain",
    "on a moonless night", "in early spring", "in a sunlit meadow", "inside a dim warehouse",
    "on a crowded street", "in an empty room", "beside a quiet river", "above the clouds",
]
STYLES = [
    "photorealistic", "35mm film photograph", "oil painting", "watercolor", "ukiyo-e woodblock print",
    "charcoal sketch", "isometric 3D render", "Art Nouveau poster", "pixel art", "claymation",
    "studio product shot", "cinematic still", "children's book illustration", "low-poly render",
    "Bauhaus graphic design", "technical blueprint", "stained glass", "impressionist painting",
    "macro photograph", "infrared photograph", "comic book panel", "papercut diorama",
]
COMPOSITIONS = [
    "wide shot", "close-up", "extreme close-up", "bird's-eye view", "low angle", "symmetrical composition",
    "rule of thirds", "shallow depth of field", "long exposure", "tilt-shift", "centered subject",
    "silhouette against the sky", "reflection in a puddle", "framed by a doorway",
]
DETAILS = [
    "soft rim light", "volumetric light rays", "rich textures", "muted earth tones", "vivid saturated colors",
    "high contrast", "pastel palette", "fine film grain", "sharp focus", "bokeh background",
    "dramatic shadows", "teal and orange grading", "monochrome", "warm ambient glow", "crisp details",
]
TEXT_PROMPTS = [
    'a neon sign that reads "OPEN 24 HOURS" above a diner door',
    'a chalkboard menu with "Soup of the Day: Tomato" written in cursive',
    'a vintage travel poster with the words "VISIT THE MOON" in bold letters',
    'a birthday cake with "Happy 90th Grandma" piped in blue icing',
    'a street sign reading "Elm Street" on a foggy corner',
    'a coffee mug printed with "But First, Coffee"',
    'a hand-painted wooden sign saying "Fresh Eggs" at a farm gate',
    'a book cover titled "The Quiet Engine" with a minimalist illustration',
    'a protest placard that says "PLANT MORE TREES"',
    'a retro arcade cabinet labeled "STAR RALLY"',
    'a bakery window decal reading "Since 1952"',
    'graffiti on a brick wall spelling "HELLO WORLD" in bubble letters',
    'a movie marquee announcing "MIDNIGHT SHOW"',
    'a t-shirt with the slogan "Ship It" in a handwritten font',
    'a license plate that reads "FP8 E4M3"',
    'a ship hull with the name "Northern Star" painted in white',
    'an embroidered patch with the text "Trail Crew 2026"',
    'a subway station sign saying "Central" in clean sans-serif type',
    'a handwritten note on a fridge: "Buy milk and call Sam"',
    'a cereal box called "Crunchy Stars" on a kitchen table',
    'a storefront awning reading "Books & Tea"',
    'a road warning sign that says "Caution: Ducks Crossing"',
    'a scoreboard showing "HOME 3 AWAY 2"',
    'a wedding invitation with "Ana & Luis" in gold calligraphy',
]
SHORT = [
    "cat", "red apple", "city skyline", "misty forest", "portrait, studio light", "abstract shapes",
    "a blue door", "ocean waves", "mountain lake", "golden retriever puppy", "night sky", "old bicycle",
]
CLAUSES = [
    "The scene feels calm and unhurried, with small details rewarding a second look.",
    "Every surface shows wear and history, scratches and patina catching the light.",
    "In the background, a few people go about their day, slightly out of focus.",
    "The air is full of drifting dust motes that glow where the light falls.",
    "Colors are restrained except for one bright accent that draws the eye.",
    "It should look like a frame from a big-budget film, carefully lit and graded.",
    "Textures are tactile: rough stone, soft fabric, polished metal and wet leaves.",
    "The mood is nostalgic, like a memory from a childhood summer.",
    "Reflections on glass and water double the light sources across the frame.",
    "There is a sense of motion, with a hint of blur on the fastest elements.",
]


def compose(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.08:
        return rng.choice(SHORT) + ", " + rng.choice(STYLES)
    parts = [rng.choice(SUBJECTS)]
    if rng.random() < 0.8:
        parts.append(rng.choice(SETTINGS))
    head = " ".join(parts)
    tags = [rng.choice(STYLES)]
    tags += rng.sample(COMPOSITIONS, rng.randint(0, 2)) + rng.sample(DETAILS, rng.randint(0, 3))
    prompt = head + ", " + ", ".join(tags)
    if kind > 0.7:  # long descriptive prompts: T5 sees long sequences in real use
        prompt += ". " + " ".join(rng.sample(CLAUSES, rng.randint(1, 4)))
    return prompt


def main() -> None:
    rng = random.Random(3_5_2024)
    prompts: list[str] = []
    seen = set()
    for text in TEXT_PROMPTS:
        prompts.append(text)
        seen.add(text)
    while len(prompts) < 560:
        text = compose(rng)
        words = len(text.split())
        if text in seen or not 3 <= words <= 70:
            continue
        seen.add(text)
        prompts.append(text)
    rng.shuffle(prompts)
    out = Path(__file__).with_name("prompts.txt")
    out.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    lengths = [len(p.split()) for p in prompts]
    print(f"{len(prompts)} prompts, {min(lengths)}-{max(lengths)} words -> {out}")


if __name__ == "__main__":
    main()
