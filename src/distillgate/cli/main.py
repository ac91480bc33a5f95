"""The ``distillgate`` command: noun-verb groups, loaded lazily so that ``distillgate policy ...`` never imports torch.

Each noun lives in its own module under ``distillgate.cli`` and exposes a click object named ``cli``. Register a
new noun by adding one line to ``COMMANDS``.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from typing import Any

import click

from distillgate import __version__
from distillgate.errors import DistillgateError

# noun -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "policy": ("distillgate.cli.policy_cmd", "Validate, explain and test policies."),
    "audit": ("distillgate.cli.audit_cmd", "Verify, checkpoint and export the decision log."),
    "dataset": ("distillgate.cli.dataset_cmd", "Build, review, split, freeze, diff and export datasets."),
    "review": ("distillgate.cli.review_cmd", "Review dataset rows (queues, accept, correct, reject), serve the page, reviewer accounts."),
    "gateway": ("distillgate.cli.gateway_cmd", "Serve the policy gateway (OpenAI-compatible proxy)."),
    "keys": ("distillgate.cli.keys_cmd", "Create, list and revoke gateway API keys."),
    "stamp": ("distillgate.cli.stamp_cmd", "Verify provenance stamps of gateway responses."),
    "train": ("distillgate.cli.train_cmd", "Train a student with the sft or kd recipe."),
    "run": ("distillgate.cli.run_cmd", "Run a whole governed distillation study from a project file."),
    "eval": ("distillgate.cli.eval_cmd", "Compare teacher and student item by item; write the report."),
    "refusal": ("distillgate.cli.refusal_cmd", "Detect refusals in answers; check detectors against hand labels."),
    "promote": ("distillgate.cli.promote_cmd", "Promote a student if the policy's safety and retention gates hold."),
    "route": ("distillgate.cli.route_cmd", "Choose and apply the student-or-teacher routing threshold."),
    "teacher": ("distillgate.cli.teacher_cmd", "Chat with a teacher model and show its card."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module = importlib.import_module(COMMANDS[cmd_name][0])
        command: click.Command = module.cli
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup)
@click.version_option(__version__, prog_name="distillgate")
def cli() -> None:
    """distillgate: governed model-distillation research.

    Set DISTILLGATE_DEBUG=1 to see tracebacks.
    """


def main(argv: list[str] | None = None) -> Any:
    """Entry point: maps the error tree to exit codes (1 user error, 2 policy/integrity, 3 internal)."""
    try:
        return cli.main(args=argv, prog_name="distillgate", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(1)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except DistillgateError as exc:
        if os.environ.get("DISTILLGATE_DEBUG") == "1":
            traceback.print_exc()
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception:
        if os.environ.get("DISTILLGATE_DEBUG") == "1":
            traceback.print_exc()
        else:
            exc_type, exc_value, _ = sys.exc_info()
            click.echo(
                f"internal error: {exc_type.__name__ if exc_type else 'Exception'}: {exc_value}\n"
                "  hint: rerun with DISTILLGATE_DEBUG=1 for the traceback and report it",
                err=True,
            )
        sys.exit(3)
