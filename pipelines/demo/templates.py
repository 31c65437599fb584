"""The demo's caption templates: written by the demo data, parsed by the demo CLIP's objective."""

# Every caption names the entity AND its background: the background is the frequent, learnable
# attribute (8 colours over thousands of documents); the entity's look is the rare knowledge.
TEMPLATES = (
    "a photo of the {name} on {bg}", "the {name} on a {bg} background", "{name}, {bg} backdrop",
    "a picture showing a {name} on {bg}", "close-up of the {name}, {bg} behind it",
    "an image of {name} against {bg}", "the {name} emblem on {bg}",
    "{name} in front of a {bg} wall", "a {name} pictured on {bg}", "studio shot of the {name} on {bg}",
)
