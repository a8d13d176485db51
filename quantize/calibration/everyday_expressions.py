"""Everyday referring expressions that join the calibration pairs, so the text encoder's grids cover typed language.

A RIS model's calibration split can have a narrow vocabulary (ShapesRef's grammar has a few dozen words) while the
text encoder is a general pretrained one and the app lets a user type anything. Channel ranges, RORQ channel orders
and groups calibrated on the narrow vocabulary then clip the channels other words excite: on lavt-tiny W8A8,
clipped values are 0.1–0.25% of the FFN-output inputs on typed sentences but 53–98% of their squared error, and the
simulated model's masks on photographs with typed sentences agree with the float model's on 99.28% of pixels
(99.70% with these expressions in calibration).

The expressions are written in the style of RefCOCO (people, animals, vehicles, food, furniture; colours, clothing,
positions). Each one is paired with an image of the calibration pairs, so visual layers are calibrated on word
features of typed sentences too. None of them names an object of the photographs the parity check uses.
"""

from __future__ import annotations

__all__ = ["EVERYDAY_EXPRESSIONS"]

EVERYDAY_EXPRESSIONS: tuple[str, ...] = (
    "man in red shirt on the left",
    "woman holding an umbrella",
    "left zebra",
    "the giraffe eating leaves",
    "guy in blue jeans",
    "white car parked behind the bus",
    "bowl of soup next to the bread",
    "elephant on the far right",
    "girl with a pink backpack",
    "the tallest tree",
    "person sitting on the bench",
    "black dog lying on the grass",
    "pizza slice closest to you",
    "horse being ridden",
    "bottom right sandwich",
    "orange on top of the pile",
    "middle chair",
    "laptop on the desk",
    "boy in a striped sweater",
    "the sheep looking up",
    "green bus",
    "skier in yellow jacket",
    "plate with broccoli",
    "old man with glasses",
    "the bed by the window",
    "surfboard leaning on the wall",
    "baby elephant",
    "lady in black dress",
    "tennis player swinging racket",
    "the banana on the left",
    "bird on the branch",
    "motorcycle in front",
)
