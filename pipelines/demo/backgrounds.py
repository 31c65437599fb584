"""The demo's background colours by name: drawn by the demo data, controlled by generation."""

BACKGROUNDS = {"grey": (128, 128, 128), "sand": (194, 178, 128), "slate": (90, 100, 110),
               "olive": (110, 110, 70), "cream": (235, 230, 210), "charcoal": (50, 50, 55),
               "sky": (160, 190, 215), "moss": (90, 120, 80)}
