"""The normal-feature memory: per-aspect embedding, class-conditional kNN, coresets."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import MEMORY_LONG_SIDE, brick_texture, fit_memory, noisy_colour
from vlmdiff.features import EFFICIENTNET_LITE0_BLOCKS
import vlmdiff.memory as memory_module
from vlmdiff.memory import (
    UNKNOWN_CLASS_DISTANCE, Coreset, NormalFeatureMemory, greedy_coreset, image_candidates, projection_matrix,
    select_coreset,
)

FEATURE_CHANNELS = sum(EFFICIENTNET_LITE0_BLOCKS[block][0] for block in NormalFeatureMemory().config.layers)
GRID = MEMORY_LONG_SIDE // 8  # patches per side of a square image


@pytest.fixture(scope="module")
def flat_images():
    return [noisy_colour(seed) for seed in range(3)]


@pytest.fixture(scope="module")
def two_class_memory():
    """'flat' (noisy red) and 'brick' (texture) classes, 40 coreset vectors each."""
    images = [noisy_colour(0), noisy_colour(1), brick_texture(0), brick_texture(1)]
    return fit_memory(images, ["flat", "flat", "brick", "brick"], vectors_per_class=40)


def test_memory_embeds_each_image_at_its_own_aspect(flat_images):
    memory = fit_memory(flat_images[:1], ["a"])
    assert memory.embed(flat_images[0]).shape == (FEATURE_CHANNELS, GRID, GRID)
    assert memory.input_size(300, 200) == (40, 64)  # (h, w): long side 64, aspect kept on the stride-8 grid
    assert memory.embed(noisy_colour(5, size=(300, 200))).shape == (FEATURE_CHANNELS, 5, 8)
    assert memory.embed(noisy_colour(5, size=(100, 300))).shape == (FEATURE_CHANNELS, 8, 4)  # 21 px, rounded to 24


def test_memory_distance_is_zero_in_the_bank_and_positive_far_away(flat_images):
    memory = fit_memory(flat_images, ["a"] * 3, vectors_per_class=3 * GRID * GRID)  # keeps every patch
    assert memory.bank.shape == (3 * GRID * GRID, FEATURE_CHANNELS)
    assert memory.config.class_names == ("a",)
    features = memory.embed(flat_images[1])
    inside = memory.distance_map(features)
    assert inside.shape == (GRID, GRID)
    typical = float(features.norm(dim=0).mean())  # ~60
    assert float(inside.max()) < 2e-3 * typical  # float16 bank
    far = memory.distance_map(features + 10.0)
    assert float(far.min()) > 10.0


def test_memory_coreset_keeps_the_requested_count_per_class(two_class_memory):
    memory = two_class_memory
    assert memory.bank.shape == (2 * 40, FEATURE_CHANNELS)
    assert memory.bank_class.tolist().count(0) == memory.bank_class.tolist().count(1) == 40
    assert torch.isfinite(memory.distance_map(memory.embed(noisy_colour(9)))).all()


def test_memory_neighbours_average_the_k_nearest(flat_images):
    one = fit_memory(flat_images, ["a"] * 3, neighbours=1)
    three = fit_memory(flat_images, ["a"] * 3, neighbours=3)
    assert torch.equal(one.bank, three.bank)
    features = one.embed(flat_images[0])
    near, average = one.distance_map(features), three.distance_map(features)
    assert bool((average >= near).all())
    assert float(average.mean()) > float(near.mean()) + 1.0  # the 2nd and 3rd neighbours are other patches


@pytest.fixture(scope="module")
def six_per_class_memory():
    """'flat' and 'brick' from six images each: enough to know how far a class's images spread."""
    images = [noisy_colour(seed) for seed in range(6)] + [brick_texture(seed) for seed in range(6)]
    return fit_memory(images, ["flat"] * 6 + ["brick"] * 6, vectors_per_class=40)


def test_memory_match_class_picks_the_right_class(six_per_class_memory):
    memory = six_per_class_memory
    assert memory.config.class_names == ("brick", "flat")
    assert memory.class_means.shape == (2, FEATURE_CHANNELS) and bool((memory.class_radii > 0).all())
    for image, expected, other in [
        (noisy_colour(7), "flat", "brick"),
        (brick_texture(7), "brick", "flat"),
        (noisy_colour(8, size=(90, 60)), "flat", "brick"),  # other sizes and aspects
        (brick_texture(9, size=(60, 100)), "brick", "flat"),
    ]:
        match = memory.match_class(memory.embed(image))
        assert (match.name, match.runner_up) == (expected, other)
    for image in (noisy_colour(7), brick_texture(7)):  # the classes' own kind of image: known
        assert memory.match_class(memory.embed(image)).known


def test_an_image_of_no_known_class_is_unknown_and_names_the_nearest(six_per_class_memory):
    ramp = np.tile(np.linspace(0, 255, 96, dtype=np.uint8), (96, 1))
    match = six_per_class_memory.match_class(six_per_class_memory.embed(Image.fromarray(ramp).convert("RGB")))
    assert not match.known and match.distance > UNKNOWN_CLASS_DISTANCE
    assert match.describe().startswith("unknown class") and match.name in match.describe()


def test_memory_without_classes_cannot_match():
    memory = NormalFeatureMemory(long_side=MEMORY_LONG_SIDE)
    with pytest.raises(ValueError, match="no class"):
        memory.match_class(memory.embed(noisy_colour(0)))


def test_memory_search_is_class_conditional(two_class_memory):
    memory = two_class_memory
    features = memory.embed(noisy_colour(0))  # a 'flat' image of the memory
    own, other, every = (memory.distance_map(features, name) for name in ("flat", "brick", None))
    assert float(own.mean()) < 0.25 * float(other.mean())  # a patch matching 'flat' is far under 'brick'
    assert float(other.min()) > float(own.max())
    assert torch.allclose(every, own)  # no class: every row is searched, 'flat' rows are nearest
    assert torch.equal(memory.distance_map(features, "never-seen"), every)  # an unknown class searches all


def test_memory_with_class_replaces_one_class_and_keeps_the_others(two_class_memory):
    memory = two_class_memory
    bank, classes, means = memory.bank.clone(), memory.bank_class.clone(), memory.class_means.clone()
    brick_rows = bank[classes == 0]
    green = [noisy_colour(seed, colour=(30, 190, 60)) for seed in (20, 21)]
    replaced = memory.with_class(green, "flat", vectors=25)
    assert torch.equal(memory.bank, bank) and torch.equal(memory.bank_class, classes)  # a new memory
    assert torch.equal(memory.class_means, means)
    assert replaced.config.class_names == ("brick", "flat")
    assert replaced.bank.shape == (40 + 25, FEATURE_CHANNELS)
    assert torch.equal(replaced.bank[replaced.bank_class == 0], brick_rows)
    assert torch.equal(replaced.class_means[0], means[0])
    assert not torch.equal(replaced.class_means[1], means[1])
    red, new_green = replaced.embed(noisy_colour(0)), replaced.embed(green[0])
    assert float(replaced.distance_map(new_green, "flat").mean()) < 0.5 * float(memory.distance_map(new_green, "flat").mean())
    assert float(replaced.distance_map(red, "flat").mean()) > 2 * float(memory.distance_map(red, "flat").mean())
    assert replaced.match_class(new_green).name == "flat"

    # a new class sorted before the others: old rows are re-indexed, not lost
    added = memory.with_class(green, "apple", vectors=25)
    assert added.config.class_names == ("apple", "brick", "flat")
    assert added.bank.shape == (2 * 40 + 25, FEATURE_CHANNELS)
    for old_index, name in enumerate(memory.config.class_names):
        new_index = added.config.class_names.index(name)
        assert torch.equal(added.bank[added.bank_class == new_index], bank[classes == old_index])
        assert torch.equal(added.class_means[new_index], means[old_index])
    assert added.match_class(new_green).name == "apple"
    assert added.match_class(red).name == "flat" and added.match_class(added.embed(brick_texture(3))).name == "brick"


def test_memory_fit_rejects_mismatched_class_names(flat_images):
    with pytest.raises(ValueError, match="class name"):
        NormalFeatureMemory.fit(flat_images, ["a"] * 2, long_side=MEMORY_LONG_SIDE)
    with pytest.raises(ValueError, match="at least one image"):
        NormalFeatureMemory.fit([], [], long_side=MEMORY_LONG_SIDE)


@pytest.mark.parametrize(("count", "dim"), [(1, 16), (10, 16), (50, 300)])
def test_greedy_coreset_returns_distinct_indices(count, dim):
    vectors = torch.randn(200, dim, generator=torch.Generator().manual_seed(0))
    indices = greedy_coreset(vectors, count)
    assert indices.shape == (count,)
    assert len(set(indices.tolist())) == count
    assert int(indices.min()) >= 0 and int(indices.max()) < 200


def test_greedy_coreset_covers_better_than_random_choice():
    vectors = torch.randn(400, 8, generator=torch.Generator().manual_seed(0))
    coverage = lambda idx: float(torch.cdist(vectors, vectors[idx]).min(1).values.max())  # noqa: E731
    random_choice = torch.randperm(400, generator=torch.Generator().manual_seed(1))[:20]
    assert coverage(greedy_coreset(vectors, 20)) < coverage(random_choice)


def per_image_candidates(patches: torch.Tensor, count: int, dim: int) -> list:
    """Both stages' input for (I, P, C) same-size patches: each image's greedy candidates for a coreset of `count`."""
    projection = projection_matrix(patches.shape[2], dim=dim)
    keep = max(1, round(3 * count / len(patches)))
    return [image_candidates(p.T.reshape(-1, p.shape[0], 1), keep, projection) for p in patches]


@pytest.mark.parametrize(("images", "per_image", "count"), [(4, 64, 20), (3, 40, 100), (1, 200, 1), (5, 10, 49)])
def test_the_two_stage_coreset_returns_distinct_rows(images, per_image, count):
    patches = torch.randn(images, per_image, 32, generator=torch.Generator().manual_seed(0))
    coreset = select_coreset(per_image_candidates(patches, count, 16), count)
    assert coreset.rows.shape == (count, 32)
    assert len(set(zip(coreset.image.tolist(), coreset.position.tolist()))) == count
    assert len({tuple(row.tolist()) for row in coreset.rows}) == count
    every = select_coreset(per_image_candidates(patches, images * per_image, 16), images * per_image)
    assert len(every.rows) == images * per_image  # no selection when everything fits


def test_the_two_stage_coreset_covers_better_than_random_choice():
    """Patches of 10 common kinds plus 8 rare ones (one patch each, in one image): the coreset keeps them all."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(18, 64, generator=generator) * 3
    kinds = torch.randint(0, 10, (8, 100), generator=generator)
    kinds[torch.arange(8), torch.arange(8)] = 10 + torch.arange(8)
    patches = centres[kinds] + 0.3 * torch.randn(8, 100, 64, generator=generator)  # (I, P, C)
    vectors = patches.reshape(-1, 64)
    rows = select_coreset(per_image_candidates(patches, 40, 32), 40).rows.float()
    random_choice = vectors[torch.randperm(len(vectors), generator=torch.Generator().manual_seed(1))[:40]]
    assert set(torch.cdist(rows, centres).argmin(1).tolist()) == set(range(18))  # every kind, the rare ones included
    assert covering_radius(vectors, rows) < 0.5 * covering_radius(vectors, random_choice)


def test_a_memory_with_rotations_knows_the_turned_images():
    images = [brick_texture(seed) for seed in range(2)]
    upright = fit_memory(images, ["brick", "brick"], vectors_per_class=400)
    turning = fit_memory(images, ["brick", "brick"], vectors_per_class=400, rotations=4)
    assert len(turning.training_features(images[0])) == 4 and len(upright.training_features(images[0])) == 1
    turned = images[0].rotate(90, expand=True)
    assert float(turning.distance_map(turning.embed(turned), "brick").mean()) < 0.5 * float(
        upright.distance_map(upright.embed(turned), "brick").mean())
    assert turning.recipe["rotations"] == 4


# ---------------------------------------------------------------- a coreset that scales
def clustered_features(count: int, channels: int = 16, seed: int = 0, sizes=((8, 8),), kinds: int = 12) -> list[torch.Tensor]:
    """`count` synthetic (C, h, w) feature maps: patches around `kinds` common centres, sizes taking turns."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(kinds, channels, generator=generator) * 4
    maps = []
    for index in range(count):
        height, width = sizes[index % len(sizes)]
        kind = torch.randint(0, kinds, (height * width,), generator=generator)
        patches = centres[kind] + torch.randn(height * width, channels, generator=generator)
        maps.append(patches.T.reshape(channels, height, width))
    return maps


def covering_radius(vectors: torch.Tensor, rows: torch.Tensor) -> float:
    return float(torch.cdist(vectors, rows.float()).min(1).values.max())


@pytest.fixture
def greedy_calls(monkeypatch) -> list[tuple[int, int]]:
    """(vectors, steps) of every greedy_coreset call: its distance evaluations are vectors x steps."""
    calls = []
    original = memory_module.greedy_coreset

    def counting(vectors, count, start=None):
        calls.append((len(vectors), min(count, len(vectors)) - (len(start) if start is not None else 0)))
        return original(vectors, count, start)

    monkeypatch.setattr(memory_module, "greedy_coreset", counting)
    return calls


def test_images_of_different_sizes_are_selected_per_image(greedy_calls):
    """Each image of a mixed-size set gets its own per-image stage, and each one gives rows to the coreset."""
    sizes = ((8, 8), (5, 12), (16, 4), (3, 3))
    maps = clustered_features(8, sizes=sizes)
    for index, features in enumerate(maps):  # each image its own far-off place: the coreset must take from each
        features += 40.0 * index
    memory = NormalFeatureMemory(feature_channels=16, long_side=MEMORY_LONG_SIDE).with_features(maps, "mixed", vectors=40)
    per_image = greedy_calls[:-1]
    assert [vectors for vectors, _ in per_image] == [h * w for h, w in sizes] * 2  # one greedy per image, its own patches
    assert greedy_calls[-1][1] == 40 and greedy_calls[-1][0] <= 3 * 40 + len(maps)  # then one over the candidates
    owners = {round(float(row.float().mean()) / 40.0) for row in memory.bank}  # image k's patches lie around 40 k
    assert owners == set(range(len(maps)))


def test_the_second_stage_work_stays_bounded_as_images_grow(greedy_calls, monkeypatch):
    """Distance evaluations: the second stage's are the same for 100 and 400 images once the class is at
    MAX_CORESET rows, and all stages together grow at most linearly (the old flat greedy grew 16x)."""
    monkeypatch.setattr(memory_module, "MAX_CORESET", 150)
    memory = NormalFeatureMemory(feature_channels=16, long_side=MEMORY_LONG_SIDE, coreset_ratio=0.1)
    monkeypatch.setattr(memory_module, "MIN_CORESET", 10)
    work = {}
    for count in (100, 400):
        greedy_calls.clear()
        fitted = memory.with_features(clustered_features(count, sizes=((8, 8), (6, 10))), "c")
        assert len(fitted.bank) == 150
        second = greedy_calls[-1][0] * greedy_calls[-1][1]
        work[count] = (second, sum(vectors * steps for vectors, steps in greedy_calls))
    assert work[400][0] <= 1.1 * work[100][0]
    assert work[400][1] <= 4.5 * work[100][1]


def test_two_stage_covers_almost_as_well_as_one_greedy_over_all_patches():
    """Mixed sizes: the coreset's covering radius (largest distance of a patch to its nearest row) and mean
    distance stay close to those of one greedy over all patches (what a mixed-size class got before)."""
    maps = clustered_features(30, sizes=((8, 8), (4, 12), (10, 6)), kinds=20)
    vectors = torch.cat([m.flatten(1).T for m in maps])
    projection = projection_matrix(16, dim=16)
    for count in (60, 200):
        one_greedy = vectors[greedy_coreset(vectors @ projection, count)]
        total = len(vectors)
        candidates = [image_candidates(m, max(1, round(3 * count * m[0].numel() / total)), projection) for m in maps]
        two_stage = select_coreset(candidates, count).rows
        assert two_stage.shape == (count, 16) and two_stage.dtype == torch.float16
        mean_distance = lambda rows: float(torch.cdist(vectors, rows.float()).min(1).values.mean())  # noqa: E731
        assert covering_radius(vectors, two_stage) <= 1.25 * covering_radius(vectors, one_greedy)
        assert mean_distance(two_stage) <= 1.1 * mean_distance(one_greedy)


def test_a_greedy_continued_from_its_own_prefix_is_the_same_greedy():
    vectors = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    whole = greedy_coreset(vectors, 40)
    assert torch.equal(greedy_coreset(vectors, 40, start=whole[:15]), whole)
    assert torch.equal(greedy_coreset(vectors, 10, start=whole[:15]), whole[:10])  # more given than asked: a prefix


def test_a_continued_greedy_keeps_its_start_and_covers_the_rest():
    vectors = torch.randn(300, 8, generator=torch.Generator().manual_seed(1))
    start = torch.tensor([5, 17, 230])
    chosen = greedy_coreset(vectors, 30, start=start)
    assert torch.equal(chosen[:3], start) and len(set(chosen.tolist())) == 30
    # each step takes the vector farthest from all chosen before it, the start included
    for k in range(3, 30):
        farthest = torch.cdist(vectors, vectors[chosen[:k]]).min(1).values.argmax()
        assert int(chosen[k]) == int(farthest)


def test_a_restricted_coreset_keeps_the_given_images_rows_renumbered():
    coreset = Coreset(torch.arange(12.0).reshape(6, 2).half(), torch.tensor([0, 2, 1, 2, 3, 0]), torch.tensor([0, 0, 0, 1, 0, 1]))
    kept = coreset.restricted([2, 3])
    assert kept.image.tolist() == [0, 0, 1] and kept.position.tolist() == [0, 1, 0]
    assert kept.rows.tolist() == [[2.0, 3.0], [6.0, 7.0], [8.0, 9.0]]


def test_a_fold_continued_from_the_class_coreset_needs_few_steps_and_excludes_the_fold(greedy_calls):
    """The memory of all images but one fold, continued from the coreset of all images: it holds none of the
    fold's rows, takes fewer greedy steps than a fresh selection, and covers the other images about as well."""
    maps = clustered_features(20, sizes=((8, 8), (6, 10)), kinds=10)
    for index, features in enumerate(maps):
        features += 0.01 * index  # each row can be traced to its image
    projection = projection_matrix(16, dim=16)
    candidates = [image_candidates(m, 24, projection) for m in maps]
    whole = select_coreset(candidates, 60)
    rest = [k for k in range(20) if k % 5]  # fold 0: images 0, 5, 10, 15
    greedy_calls.clear()
    continued = select_coreset([candidates[k] for k in rest], 48, whole.restricted(rest))
    continued_steps = greedy_calls[-1][1]
    fresh = select_coreset([candidates[k] for k in rest], 48)
    assert continued_steps < 0.5 * greedy_calls[-1][1]
    assert set(continued.image.tolist()) <= set(range(len(rest)))  # renumbered images of the rest only
    fold_rows = torch.cat([candidates[k].rows for k in range(0, 20, 5)]).float()
    assert torch.cdist(continued.rows.float(), fold_rows).min() > 0.001
    others = torch.cat([maps[k].flatten(1).T for k in rest])
    assert covering_radius(others, continued.rows) <= 1.25 * covering_radius(others, fresh.rows)


def test_the_coreset_size_is_the_ratio_within_bounds():
    memory = NormalFeatureMemory()
    assert memory.coreset_size(500) == 500
    assert memory.coreset_size(60 * 48 * 48) == 4148  # 3% of 60 square images: as before
    assert memory.coreset_size(1000 * 48 * 48) == memory_module.MAX_CORESET


def test_search_follows_the_class_and_a_changed_bank(two_class_memory):
    """The rows a search compares with are kept between searches of one class, never reused for another class
    or after the bank changed in place."""
    memory = NormalFeatureMemory.from_config(two_class_memory.config)
    memory.load_state_dict(two_class_memory.state_dict())
    memory._extractor = two_class_memory._extractor
    features = memory.embed(noisy_colour(9))
    flat = memory.distance_map(features, "flat")
    assert torch.equal(memory.distance_map(features, "flat"), flat)
    brick = memory.distance_map(features, "brick")
    assert float(brick.mean()) > float(flat.mean())  # a red image is farther from the brick rows
    memory.bank[memory.bank_class == memory.config.class_names.index("flat")] += 5.0
    moved = memory.distance_map(features, "flat")
    assert float(moved.mean()) > float(flat.mean()) + 1.0
    fresh = NormalFeatureMemory.from_config(memory.config)
    fresh.load_state_dict(memory.state_dict())
    assert torch.allclose(fresh.distance_map(features, "flat"), moved)
