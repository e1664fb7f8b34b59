"""A dataset module: the held-out quarter of the digits data set as pipeline items."""

from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import tessera


class DigitsData(tessera.Task):
    def items(self, part=0, parts=1, limit=None):
        """Every `parts`-th held-out digit from `part`, as {"x": 64 pixels 0..16, "y": label}."""
        x, y = load_digits(return_X_y=True)
        _, x_test, _, y_test = train_test_split(x, y, test_size=0.25, random_state=0)
        rows = range(int(part), len(y_test), int(parts))
        items = [{"x": x_test[i].tolist(), "y": int(y_test[i])} for i in rows]
        return items[: int(limit)] if limit is not None else items
