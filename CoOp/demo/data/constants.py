"""Names, sizes and source lists of DigitsDG-mini and its open-set folders."""
from __future__ import annotations

BUILDER_VERSION = 1

CLASSNAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DOMAINS = ["mnist", "digits8x8", "photoblend", "inkpaper"]
MNIST_DOMAINS = ["mnist", "photoblend", "inkpaper"]  # each gets its own disjoint pool of mnist_5k

DIGITS_FOLDER = "DigitsDG"
FASHION_FOLDER = "fashion-mnist"
FASHION_SPLIT = "split_FashionMNIST.json"
TEXTURES_FOLDER = "textures-mini"
TEXTURES_SPLIT = "split_TexturesMini.json"

DEFAULT_PER_CLASS = 150
DEFAULT_OOD_PER_CLASS = 100
IMAGE_SIZE = 32
VAL_FRACTION = 0.2  # DigitsDG source domains: 80 % train / 20 % val per domain and class
OOD_FRACTIONS = (0.5, 0.2, 0.3)  # open-set sets: train / val / test per class

FASHION_CLASSNAMES = ["t-shirt", "trouser", "pullover", "dress", "coat",
                      "sandal", "shirt", "sneaker", "bag", "ankle_boot"]
FASHION_DIR_DEFAULT = "/usr/share/datasets/fashion-mnist"

# (class name, source library, image name) -- one source image per class
TEXTURE_SOURCES = [
    ("brick_wall", "skimage", "brick"),
    ("grass", "skimage", "grass"),
    ("gravel", "skimage", "gravel"),
    ("coins", "skimage", "coins"),
    ("moon_surface", "skimage", "moon"),
    ("galaxies", "skimage", "hubble_deep_field"),
    ("stained_tissue", "skimage", "immunohistochemistry"),
    ("retina", "skimage", "retina"),
    ("cat", "skimage", "chelsea"),
    ("clock", "skimage", "clock"),
]
# colour photos used as MNIST-M backgrounds (disjoint from the texture sources above)
BLEND_BACKGROUNDS = [
    ("sklearn", "china.jpg"),
    ("sklearn", "flower.jpg"),
    ("skimage", "astronaut"),
    ("skimage", "coffee"),
    ("skimage", "rocket"),
]


class SourceMissingError(RuntimeError):
    """A package that provides source images is not installed."""
