"""Text used to train the offline tokenizers of the tiny model zoo.

No machine here reaches a model hub, so every tiny model's tokenizer is trained from this corpus
with the `tokenizers` library. It mixes the bundled demo prompts' vocabulary with generic caption
language so that prompts and recaptions tokenize into real words rather than bytes.
"""

from __future__ import annotations

_CAPTION_WORDS = """
a an the of in on at with and or to from by for under over near behind beside above below
photo photograph picture image painting drawing illustration render sketch poster portrait
close-up wide shot view scene landscape cityscape interior exterior macro aerial detailed
red orange yellow green blue purple pink brown black white gray grey golden silver colorful
dark bright light soft warm cool vivid pastel muted shiny glossy matte wooden metal glass stone
cat dog bird horse cow sheep elephant giraffe zebra bear fox rabbit owl fish butterfly dragon
man woman child boy girl person people old young smiling standing sitting walking running
car bus truck bicycle motorcycle train airplane boat ship rocket astronaut robot castle house
tree trees flower flowers forest mountain mountains river lake sea ocean beach sky clouds sun
moon stars night day sunset sunrise snow rain fog city street road bridge tower building
table chair cup coffee book lamp window door wall floor kitchen room garden park field
hydrant skyscraper clock umbrella bench vase bowl pizza cake apple banana orange sandwich
style oil watercolor digital art cinematic lighting realistic photorealistic fantasy anime
high quality highly detailed 4k 8k trending artstation sharp focus depth of field bokeh
describe this image in detail shows there is are it its which that has have one two three
four five several many large small tiny huge big little tall short long round square
""".split()


def tokenizer_corpus(repeats: int = 4) -> list[str]:
    """Sentences for tokenizer training: deterministic, a few thousand lines."""
    words = _CAPTION_WORDS
    lines = []
    for r in range(repeats):
        for i in range(len(words)):
            # Deterministic pseudo-sentences: every word appears next to many others.
            lines.append(" ".join(words[(i * (r + 3) + k * 7) % len(words)] for k in range(12)))
    lines.extend(" ".join(words[i : i + 16]) for i in range(0, len(words), 4))
    return lines
