from tests.fuzz_readers import fuzz, seed_folders


def test_readers_fail_only_with_clear_errors(tmp_path):
    outcomes = fuzz(seed_folders(tmp_path), cases=300, seed=1)
    assert outcomes["refused"] > 100, outcomes  # the mutations really break things
