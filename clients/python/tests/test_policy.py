"""The pure selection rules (no Jupyter needed)."""

import unittest

from envgate_client.policy import policy_names, select_env


def spec(metadata):
    return {"name": "python3", "spec": {"argv": [], "metadata": metadata}, "resources": {}}


class PolicyNames(unittest.TestCase):
    def test_published_list(self):
        self.assertEqual(policy_names(spec({"client_envs": ["A", "B"]})), frozenset({"A", "B"}))

    def test_empty_list_allows_nothing(self):
        self.assertEqual(policy_names(spec({"client_envs": []})), frozenset())

    def test_nothing_published_is_none(self):
        # "not told" differs from "told: nothing", so the caller can fall back to allowed_envs.
        for model in [spec({}), {"name": "x", "spec": {}}, {"name": "x"}, None, [], "x"]:
            self.assertIsNone(policy_names(model), model)

    def test_malformed_never_widens(self):
        self.assertEqual(policy_names(spec({"client_envs": "A,B"})), frozenset())
        self.assertEqual(policy_names(spec({"client_envs": ["A", 1, None, ""]})), frozenset({"A"}))


class SelectEnv(unittest.TestCase):
    def test_allowed_and_kernel_prefix_only(self):
        environ = {"A": "1", "SECRET": "s", "PATH": "/bin", "KERNEL_USERNAME": "alice"}
        self.assertEqual(
            select_env(environ, {}, frozenset({"A", "NOT_SET"})),
            {"A": "1", "KERNEL_USERNAME": "alice"},
        )

    def test_extra_wins_and_is_filtered_too(self):
        env = select_env({"A": "old"}, {"A": "new", "JPY_SESSION_NAME": "x", "KERNEL_X": "k"}, frozenset({"A"}))
        self.assertEqual(env, {"A": "new", "KERNEL_X": "k"})

    def test_prefix_is_case_sensitive(self):
        # Gateways match KERNEL_ case-sensitively; so must the client.
        self.assertEqual(select_env({"kernel_x": "1", "Kernel_Y": "2"}, {}, frozenset()), {})


if __name__ == "__main__":
    unittest.main()
