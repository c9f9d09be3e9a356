"""Train a decision tree on iris, log it to MLflow and register it.

Contract (the MLproject's entry point ``main``; also runs alone as ``python main.py``):

- ``--tree-depth`` must be a positive integer in decimal digits. Anything else ends the script
  with exit status 2 and one line on stderr naming the value, before anything is logged:
  MLflow 3.17 passes an ``int`` parameter through unchecked, so this is the only place a bad
  one is stopped (``mlflow run`` then marks the run FAILED and exits non-zero; the params it
  logged itself, such as ``tree_depth=abc``, stay on that run).
- Trains ``DecisionTreeClassifier(max_depth=tree_depth)`` on the iris data set scikit-learn
  ships (no download), with a fixed, stratified 70/30 split and fixed seeds, so one depth
  always gives the same metrics.
- Logs to the active run (``mlflow run`` provides one; otherwise a new run): the param
  ``tree_depth`` (as given); the metrics ``precision``, ``recall`` (macro averages) and
  ``accuracy`` on the test split; the artifact ``confusion_matrix.png``; the model at
  ``model`` with a signature and an input example, registered as a new version of
  ``--model-name`` (created if missing).
- Prints the run ID and the registered version on stdout.
"""

import argparse
import sys

import matplotlib

matplotlib.use("Agg")  # no display on a server or in CI; must precede pyplot's import

import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import mlflow.sklearn  # noqa: E402
from mlflow.models import infer_signature  # noqa: E402
from sklearn.datasets import load_iris  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    ConfusionMatrixDisplay,
    accuracy_score,
    precision_score,
    recall_score,
)
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.tree import DecisionTreeClassifier  # noqa: E402

SEED = 42


def positive_int(text: str) -> int:
    """Decimal digits only: int() would also take "+3", " 3" or "3_0"."""
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"tree_depth must be a positive integer, got {text!r}")
    return int(text)


def registered_model_name(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("model_name must not be empty")
    return text


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument gives one line (no usage block) to find in a run's log."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineParser(prog="decision-tree", description=__doc__.splitlines()[0])
    # Kept as given (and checked below): ``mlflow run`` has already logged the param as this
    # very text, and MLflow refuses to change a param, so "03" must be logged as "03", not 3.
    parser.add_argument("--tree-depth", default="2")
    parser.add_argument("--model-name", type=registered_model_name, default="iris")
    args = parser.parse_args(argv)
    try:
        args.depth = positive_int(args.tree_depth)
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    return args


def main(argv=None) -> None:
    args = parse_args(argv)  # first: a bad value must stop us before anything is logged

    iris = load_iris(as_frame=True)
    x_train, x_test, y_train, y_test = train_test_split(
        iris.data, iris.target, test_size=0.3, random_state=SEED, stratify=iris.target
    )
    model = DecisionTreeClassifier(max_depth=args.depth, random_state=SEED)
    model.fit(x_train, y_train)
    predicted = model.predict(x_test)

    with mlflow.start_run() as run:
        mlflow.log_param("tree_depth", args.tree_depth)
        # zero_division=0: a shallow tree never predicts some class; that class's precision
        # counts as 0 instead of a warning.
        mlflow.log_metrics(
            {
                "precision": precision_score(y_test, predicted, average="macro", zero_division=0),
                "recall": recall_score(y_test, predicted, average="macro", zero_division=0),
                "accuracy": accuracy_score(y_test, predicted),
            }
        )
        display = ConfusionMatrixDisplay.from_predictions(
            y_test, predicted, display_labels=iris.target_names, colorbar=False
        )
        display.ax_.set_title(f"Decision tree, depth {args.depth}")
        mlflow.log_figure(display.figure_, "confusion_matrix.png")
        plt.close(display.figure_)
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            signature=infer_signature(x_test, predicted),
            input_example=x_test.head(3),
            registered_model_name=args.model_name,
            # MLflow 3.17 saves scikit-learn models with skops, which refuses to load a tree
            # (raw node indices, unchecked) unless told the type is trusted: we made it here.
            skops_trusted_types=["sklearn.tree._tree.Tree"],
        )
    print(f"run {run.info.run_id}: {args.model_name} version {info.registered_model_version}")


if __name__ == "__main__":
    sys.exit(main())
