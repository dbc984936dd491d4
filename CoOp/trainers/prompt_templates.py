"""Prompt templates (single per-dataset template and the 7-template ImageNet ensemble)."""

# The 7-template ensemble used by CRoFT (ImageNet), Tip-Adapter and ZeroshotCLIP2.
IMAGENET_TEMPLATES_SELECT = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]

# Single template per dataset (official CUSTOM_TEMPLATES; every Setup-I/II dataset uses "a photo of a {}.").
DEFAULT_TEMPLATE = "a photo of a {}."
CUSTOM_TEMPLATES = {
    "OxfordPets": "a photo of a {}, a type of pet.",
    "OxfordFlowers": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "DescribableTextures": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "StanfordCars": "a photo of a {}.",
    "Food101": "a photo of {}, a type of food.",
    "SUN397": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.",
}
