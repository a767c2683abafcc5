"""Class names and prompt templates of the zero-shot datasets (data, not code).

Carried over from CLIP_benchmark (``clip_benchmark/datasets/
en_zeroshot_classification_templates.json`` and ``en_classnames.json``),
which the official STRUCTURE code uses through ``DATASETS_TO_TEMPLATES`` /
``DATASETS_TO_CLASSES`` (METHOD.md §8.1). Datasets missing from
``CLASSNAMES`` use the torchvision dataset's own class names with ``_`` read
as a space, as CLIP_benchmark does.
"""

from __future__ import annotations

# The single prompt of ``use_extended_prompts: false`` (METHOD.md §8.1).
DEFAULT_TEMPLATE = "a photo of a {c}"

_PHOTO_18 = [
    "a photo of a {c}.", "a blurry photo of a {c}.", "a black and white photo of a {c}.",
    "a low contrast photo of a {c}.", "a high contrast photo of a {c}.", "a bad photo of a {c}.",
    "a good photo of a {c}.", "a photo of a small {c}.", "a photo of a big {c}.",
    "a photo of the {c}.", "a blurry photo of the {c}.", "a black and white photo of the {c}.",
    "a low contrast photo of the {c}.", "a high contrast photo of the {c}.", "a bad photo of the {c}.",
    "a good photo of the {c}.", "a photo of the small {c}.", "a photo of the big {c}.",
]

IMAGENET_80 = [
    "a bad photo of a {c}.", "a photo of many {c}.", "a sculpture of a {c}.",
    "a photo of the hard to see {c}.", "a low resolution photo of the {c}.", "a rendering of a {c}.",
    "graffiti of a {c}.", "a bad photo of the {c}.", "a cropped photo of the {c}.",
    "a tattoo of a {c}.", "the embroidered {c}.", "a photo of a hard to see {c}.",
    "a bright photo of a {c}.", "a photo of a clean {c}.", "a photo of a dirty {c}.",
    "a dark photo of the {c}.", "a drawing of a {c}.", "a photo of my {c}.", "the plastic {c}.",
    "a photo of the cool {c}.", "a close-up photo of a {c}.", "a black and white photo of the {c}.",
    "a painting of the {c}.", "a painting of a {c}.", "a pixelated photo of the {c}.",
    "a sculpture of the {c}.", "a bright photo of the {c}.", "a cropped photo of a {c}.",
    "a plastic {c}.", "a photo of the dirty {c}.", "a jpeg corrupted photo of a {c}.",
    "a blurry photo of the {c}.", "a photo of the {c}.", "a good photo of the {c}.",
    "a rendering of the {c}.", "a {c} in a video game.", "a photo of one {c}.", "a doodle of a {c}.",
    "a close-up photo of the {c}.", "a photo of a {c}.", "the origami {c}.",
    "the {c} in a video game.", "a sketch of a {c}.", "a doodle of the {c}.", "a origami {c}.",
    "a low resolution photo of a {c}.", "the toy {c}.", "a rendition of the {c}.",
    "a photo of the clean {c}.", "a photo of a large {c}.", "a rendition of a {c}.",
    "a photo of a nice {c}.", "a photo of a weird {c}.", "a blurry photo of a {c}.",
    "a cartoon {c}.", "art of a {c}.", "a sketch of the {c}.", "a embroidered {c}.",
    "a pixelated photo of a {c}.", "itap of the {c}.", "a jpeg corrupted photo of the {c}.",
    "a good photo of a {c}.", "a plushie {c}.", "a photo of the nice {c}.",
    "a photo of the small {c}.", "a photo of the weird {c}.", "the cartoon {c}.",
    "art of the {c}.", "a drawing of the {c}.", "a photo of the large {c}.",
    "a black and white photo of a {c}.", "the plushie {c}.", "a dark photo of a {c}.",
    "itap of a {c}.", "graffiti of the {c}.", "a toy {c}.", "itap of my {c}.",
    "a photo of a cool {c}.", "a photo of a small {c}.", "a tattoo of the {c}.",
]

TEMPLATES: dict[str, list[str]] = {
    "cifar10": _PHOTO_18,
    "cifar100": _PHOTO_18,
    "imagenet1k": IMAGENET_80,
    "stl10": ["a photo of a {c}.", "a photo of the {c}."],
    "food101": ["a photo of {c}, a type of food."],
    "pets": ["a photo of a {c}, a type of pet."],
    "flowers": ["a photo of a {c}, a type of flower."],
    "dtd": [
        "a photo of a {c} texture.", "a photo of a {c} pattern.", "a photo of a {c} thing.",
        "a photo of a {c} object.", "a photo of the {c} texture.", "a photo of the {c} pattern.",
        "a photo of the {c} thing.", "a photo of the {c} object.",
    ],
    "mnist": ['a photo of the number: "{c}".'],
    "default": [DEFAULT_TEMPLATE],
}

CLASSNAMES: dict[str, list[str]] = {
    "pets": [
        "Abyssinian", "American Bulldog", "American Pit Bull Terrier", "Basset Hound", "Beagle",
        "Bengal", "Birman", "Bombay", "Boxer", "British Shorthair", "Chihuahua", "Egyptian Mau",
        "English Cocker Spaniel", "English Setter", "German Shorthaired", "Great Pyrenees",
        "Havanese", "Japanese Chin", "Keeshond", "Leonberger", "Maine Coon", "Miniature Pinscher",
        "Newfoundland", "Persian", "Pomeranian", "Pug", "Ragdoll", "Russian Blue", "Saint Bernard",
        "Samoyed", "Scottish Terrier", "Shiba Inu", "Siamese", "Sphynx",
        "Staffordshire Bull Terrier", "Wheaten Terrier", "Yorkshire Terrier",
    ],
    "flowers": [
        "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea",
        "english marigold", "tiger lily", "moon orchid", "bird of paradise", "monkshood",
        "globe thistle", "snapdragon", "colt's foot", "king protea", "spear thistle", "yellow iris",
        "globe flower", "purple coneflower", "peruvian lily", "balloon flower",
        "giant white arum lily", "fire lily", "pincushion flower", "fritillary", "red ginger",
        "grape hyacinth", "corn poppy", "prince of wales feathers", "stemless gentian", "artichoke",
        "sweet william", "carnation", "garden phlox", "love in the mist", "mexican aster",
        "alpine sea holly", "ruby-lipped cattleya", "cape flower", "great masterwort", "siam tulip",
        "lenten rose", "barbeton daisy", "daffodil", "sword lily", "poinsettia", "bolero deep blue",
        "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion", "petunia",
        "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura",
        "geranium", "orange dahlia", "pink and yellow dahlia", "cautleya spicata",
        "japanese anemone", "black-eyed susan", "silverbush", "californian poppy", "osteospermum",
        "spring crocus", "bearded iris", "windflower", "tree poppy", "gazania", "azalea",
        "water lily", "rose", "thorn apple", "morning glory", "passion flower", "lotus", "toad lily",
        "anthurium", "frangipani", "clematis", "hibiscus", "columbine", "desert-rose", "tree mallow",
        "magnolia", "cyclamen", "watercress", "canna lily", "hippeastrum", "bee balm", "air plant",
        "foxglove", "bougainvillea", "camellia", "mallow", "mexican petunia", "bromelia",
        "blanket flower", "trumpet creeper", "blackberry lily",
    ],
    "mnist": [str(d) for d in range(10)],
}


def resolve_templates(templates: str | list[str] | None, dataset: str) -> list[str]:
    """A template list: a name in :data:`TEMPLATES`, an explicit list, or the
    dataset's own list (falling back to the single default prompt)."""
    if templates is None:
        return TEMPLATES.get(dataset, TEMPLATES["default"])
    if isinstance(templates, str):
        if templates not in TEMPLATES:
            raise ValueError(f"unknown template list {templates!r}; known: {sorted(TEMPLATES)}")
        return TEMPLATES[templates]
    if not templates or not all(isinstance(t, str) and "{c}" in t for t in templates):
        raise ValueError("templates must be a non-empty list of strings containing '{c}'")
    return list(templates)


def class_prompts(class_names: list[str], templates: list[str]) -> list[list[str]]:
    """[C][T] prompt texts, class-major as the official evaluation orders them."""
    return [[t.replace("{c}", name) for t in templates] for name in class_names]
