"""The Shapes world's vocabulary: every attribute value, which ones pre-training sees, which are held out.

Order matters: label indices used by the oracle are positions in these tuples.
"""

SHAPES = ("circle", "square", "triangle", "star", "heart", "diamond", "hexagon", "cross")

# RGB of each color word; renders jitter brightness a little around these.
COLORS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 60),
    "cyan": (40, 205, 225),
    "blue": (40, 70, 225),
    "purple": (140, 50, 190),
    "pink": (250, 125, 185),
}
COLOR_NAMES = tuple(COLORS)

SIZES = ("small", "big")
# Object radius as a fraction of the image side.
SIZE_RADIUS = {"small": 0.125, "big": 0.195}

POSITIONS = ("left", "right", "top", "bottom", "center")
POSITION_XY = {
    "left": (0.23, 0.5),
    "right": (0.77, 0.5),
    "top": (0.5, 0.23),
    "bottom": (0.5, 0.77),
    "center": (0.5, 0.5),
}

BASE_PATTERNS = ("solid", "striped", "dotted", "checkered")
# Pattern words never seen in pre-training: the attribute-learning task (SPF) teaches them.
HELDOUT_PATTERNS = ("zigzag", "gradient")
PATTERNS = BASE_PATTERNS + HELDOUT_PATTERNS

BACKGROUNDS = ("white", "night", "grass", "sky", "sand", "water", "wood", "brick")

BASE_STYLES = ("plain", "cartoon")
# A rendering style absent from pre-training: the domain task (concept-centric model + GCFG).
HELDOUT_STYLES = ("retro",)
STYLES = BASE_STYLES + HELDOUT_STYLES

# Markings only concepts carry; no base caption can describe them.
MARKINGS = ("none", "split", "band", "dot", "rim", "quarters")
