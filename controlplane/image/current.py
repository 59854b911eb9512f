"""The image of the current recipe: what ``avm vm up`` and Tier-2 jobs boot unless told a digest.

The image store may be shared by several checkouts (``$AVM_IMAGE_CACHE``), so "the newest image"
is not "this checkout's image". ``recipe_image`` looks the image up by the store key the build
would give it here: the recipe's digest, the sha256 its wheel programs' RECORD lists (read,
not hashed: the build checks the bytes), and the sha256 of this avm's build code.
"""

from __future__ import annotations

from controlplane.errors import OperationalError
from controlplane.home import Home
from controlplane.image import binaries as imagebinaries
from controlplane.image.build import store_key_of
from controlplane.image.golden import MANIFEST, GoldenImage, image_store, load_image
from controlplane.image.recipe import DEFAULT_RECIPE, Recipe, load_recipe


def recipe_store_key(recipe: Recipe) -> str:
    """``store_key`` of ``recipe`` built in this environment, from the wheels' RECORD (no hashing)."""
    return store_key_of(recipe, {b.name: imagebinaries.recorded_sha256(b) for b in recipe.wheel_binaries})


def recipe_image(home: Home, recipe: Recipe | None = None) -> GoldenImage:
    """The built image of ``recipe`` (default: images/golden.yaml) with this environment's wheel
    programs: what ``avm vm up`` and Tier-2 jobs boot unless told a digest.

    Not "the newest image in the store": a store shared by several checkouts holds images of
    other recipe versions too. Raises ``OperationalError('image-not-built')`` when this recipe's
    image is not built, naming the newest other one (``--image DIGEST`` uses it on purpose).
    """
    recipe = recipe or load_recipe(DEFAULT_RECIPE)
    key = recipe_store_key(recipe)
    directory = image_store(home) / key.removeprefix("sha256:")
    if (directory / MANIFEST).is_file():
        image = GoldenImage.load(directory)
        image.check_present()
        return image
    try:
        other = load_image(home)
    except OperationalError:
        raise OperationalError(
            "image-not-built",
            f"the image of recipe {recipe.name} (store key {key}) is not built in {image_store(home)}",
            hint="run `avm image build`",
        ) from None
    raise OperationalError(
        "image-not-built",
        f"the image of recipe {recipe.name} (store key {key}) is not built in {image_store(home)}; "
        f"the newest other image there is {other.digest} (recipe {other.manifest.recipe_digest})",
        hint=f"run `avm image build`, or pass --image {other.digest} to use that one",
        details={"expected": key, "actual": other.digest},
    )
