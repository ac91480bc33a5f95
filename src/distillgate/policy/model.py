"""The ``Policy`` document: what a distillation project may do, loaded from JSON or YAML.

The seed document (``policy_id``, ``allowed_projects``, ``allowed_outputs``, ``blocked_outputs``, ``quotas``,
``audit``) loads exactly as written; every other key is optional with a default that keeps the seed's meaning.
Unknown keys are rejected, and every problem in a file is reported at once with its path and a fix
(see ``docs/policy.md`` for each key).
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import re
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distillgate.destinations import parse_destination
from distillgate.errors import ConfigError, ConfigIssue, DestinationError, NotFoundError
from distillgate.policy.extraction_rules import ExtractionRules
from distillgate.policy.promotion_rules import PromotionRules

NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.:/@-]{0,127}$"


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UserQuota(StrictModel):
    tokens_per_day: int | None = Field(default=None, ge=0)


class Quotas(StrictModel):
    """Volume limits. Days are UTC calendar days (00:00:00Z to 24:00:00Z)."""

    tokens_per_day: int | None = Field(default=None, ge=0, description="per project, per UTC day")
    records_per_run: int | None = Field(default=None, ge=0, description="choices (n) per policy_run_id")
    max_tokens_per_request: int | None = Field(default=None, ge=1)
    default_max_tokens: int = Field(default=1024, ge=1, description="reserved when a request names no max_tokens")
    user_tokens_per_day: int | None = Field(default=None, ge=0, description="default for every user, per UTC day")
    users: dict[str, UserQuota] = Field(default_factory=dict)

    def tokens_per_day_for(self, user: str | None) -> int | None:
        if user is not None and user in self.users and self.users[user].tokens_per_day is not None:
            return self.users[user].tokens_per_day
        return self.user_tokens_per_day


class Audit(StrictModel):
    reason_codes: bool = True
    export: str | None = Field(default=None, description="default export destination; always allowed")
    log_content: bool = Field(default=False, description="store request/response content in the log")
    checkpoint_every: int = Field(default=1000, ge=1)


class OutputContract(StrictModel):
    """The format an output type must have; checked on the teacher's answer."""

    json_schema: dict[str, Any] | None = None
    labels: list[str] | None = None
    max_chars: int | None = Field(default=None, ge=1)
    min_chars: int | None = Field(default=None, ge=0)
    enforcement: Literal["block", "flag"] = "flag"

    @field_validator("json_schema")
    @classmethod
    def _schema_is_valid(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            import jsonschema

            try:
                jsonschema.Draft202012Validator.check_schema(value)
            except jsonschema.SchemaError as exc:
                raise ValueError(f"not a valid JSON schema: {exc.message}") from exc
        return value


class Review(StrictModel):
    """Who reviews which project, and what a sign-off needs before a study's data may be trained on or leave.

    With ``required``, training, evaluation for promotion and every data export (dataset, run bundle, student) need
    sign-offs of the dataset version by ``min_reviewers`` distinct listed reviewers, none of them the run's requester.
    A sign-off is refused while a queue named in ``empty_queues`` still holds unreviewed rows (``"*"``: every queue).
    """

    required: bool = Field(default=False, description="a run needs a named reviewer other than its requester")
    reviewers: dict[str, list[str]] = Field(default_factory=dict, description="project (or '*') -> reviewers")
    min_reviewers: int = Field(default=1, ge=1, description="distinct reviewers whose sign-off a run needs")
    empty_queues: list[str] = Field(default_factory=list,
                                    description="review queues that must be empty before a sign-off ('*': all)")

    def reviewers_for(self, project: str | None) -> list[str] | None:
        if project is not None and project in self.reviewers:
            return self.reviewers[project]
        return self.reviewers.get("*")


class Hardening(StrictModel):
    max_top_logprobs: int | None = Field(default=20, ge=0)
    allow_logit_bias: bool = True
    max_logit_bias_entries: int | None = Field(default=None, ge=0)
    round_logprobs: int | None = Field(default=None, ge=0, le=10, description="decimals kept in logprobs")


class Policy(StrictModel):
    policy_id: str = Field(pattern=NAME_RE)
    description: str = ""
    allowed_projects: list[str]
    allowed_outputs: list[str]
    blocked_outputs: list[str] = Field(default_factory=list)
    quotas: Quotas = Field(default_factory=Quotas)
    audit: Audit = Field(default_factory=Audit)
    project_users: dict[str, list[str]] = Field(default_factory=dict)
    approved_models: list[str] | None = Field(default=None, description="glob patterns; None allows any model")
    approved_datasets: list[str] | None = Field(default=None, description="glob patterns; None allows any")
    allowed_destinations: list[str] = Field(default_factory=list, description="URL prefixes for exports")
    output_contracts: dict[str, OutputContract] = Field(default_factory=dict)
    review: Review = Field(default_factory=Review)
    hardening: Hardening = Field(default_factory=Hardening)
    extraction: ExtractionRules = Field(default_factory=ExtractionRules)
    promotion: PromotionRules = Field(default_factory=PromotionRules)

    @model_validator(mode="after")
    def _consistent(self) -> Policy:
        problems: list[str] = []
        both = sorted(set(self.allowed_outputs) & set(self.blocked_outputs))
        if both:
            problems.append(f"output types both allowed and blocked: {', '.join(both)}")
        for project in self.project_users:
            if project != "*" and project not in self.allowed_projects:
                problems.append(f"project_users names {project!r}, which is not in allowed_projects")
        for output in self.output_contracts:
            if output not in self.allowed_outputs:
                problems.append(f"output_contracts names {output!r}, which is not in allowed_outputs")
        for project in self.review.reviewers:
            if project != "*" and project not in self.allowed_projects:
                problems.append(f"review.reviewers names {project!r}, which is not in allowed_projects")
        for url in self.destinations():  # a destination nothing can write would only fail at export time
            try:
                parse_destination(url)
            except DestinationError as exc:
                problems.append(f"destination {url!r}: {exc.message} ({exc.hint})")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def warnings(self) -> list[str]:
        """Valid but surprising settings (``policy validate`` prints them)."""
        out = []
        quotas = self.quotas
        if quotas.max_tokens_per_request is not None and quotas.default_max_tokens > quotas.max_tokens_per_request:
            out.append(f"quotas.default_max_tokens ({quotas.default_max_tokens}) exceeds quotas.max_tokens_per_request "
                       f"({quotas.max_tokens_per_request}): every request without max_tokens is refused with "
                       f"MAX_TOKENS_EXCEEDED; set default_max_tokens to {quotas.max_tokens_per_request} or less")
        return out

    @cached_property
    def content_hash(self) -> str:
        """sha256 of the canonical JSON of the policy (defaults included): changes when any rule changes."""
        from distillgate.canonical import canonical_json, sha256_hex

        return sha256_hex(canonical_json(self.model_dump(mode="json")))

    # -- helpers used by decide() -------------------------------------------------------------------------------
    def users_for(self, project: str) -> list[str] | None:
        if project in self.project_users:
            return self.project_users[project]
        return self.project_users.get("*")

    def model_approved(self, model: str) -> bool:
        if self.approved_models is None:
            return True
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.approved_models)

    def dataset_approved(self, source: str) -> bool:
        if self.approved_datasets is None:
            return True
        return any(fnmatch.fnmatchcase(source, pattern) for pattern in self.approved_datasets)

    def destinations(self) -> list[str]:
        allowed = list(self.allowed_destinations)
        if self.audit.export:
            allowed.append(self.audit.export)
        return allowed


class PolicySet:
    """Several policies; each project is governed by exactly one of them."""

    def __init__(self, policies: Sequence[Policy], sources: Sequence[str] | None = None) -> None:
        if not policies:
            raise ConfigError("policies", [ConfigIssue("", "no policy found", "give a policy file or a directory")])
        self.policies = list(policies)
        self.sources = list(sources or ["<memory>"] * len(self.policies))
        issues: list[ConfigIssue] = []
        seen_ids: dict[str, str] = {}
        owner: dict[str, str] = {}
        for policy, source in zip(self.policies, self.sources, strict=True):
            if policy.policy_id in seen_ids:
                issues.append(ConfigIssue(
                    f"{source}:policy_id", f"duplicate policy_id {policy.policy_id!r} (also in {seen_ids[policy.policy_id]})",
                    "give every policy a unique policy_id",
                ))
            seen_ids[policy.policy_id] = source
            for project in policy.allowed_projects:
                if project in owner:
                    issues.append(ConfigIssue(
                        f"{source}:allowed_projects", f"project {project!r} is governed by two policies "
                        f"({owner[project]} and {policy.policy_id})", "list each project in one policy only",
                    ))
                owner[project] = policy.policy_id
        if issues:
            raise ConfigError("policies", issues)
        self._by_project = {p: next(x for x in self.policies if x.policy_id == pid) for p, pid in owner.items()}

    def select(self, project: str | None) -> Policy:
        """The policy governing ``project``; the first policy (which will deny it) when none lists it."""
        if project is not None and project in self._by_project:
            return self._by_project[project]
        return self.policies[0]

    def get(self, policy_id: str) -> Policy:
        for policy in self.policies:
            if policy.policy_id == policy_id:
                return policy
        raise NotFoundError(f"no policy with id {policy_id!r}", hint=f"known: {', '.join(self.ids())}")

    def ids(self) -> list[str]:
        return [p.policy_id for p in self.policies]

    def checkpoint_every(self) -> int:
        """How often a store serving these policies keeps a signed checkpoint: the most frequent any policy asks
        for (one log holds every project's entries)."""
        return min(p.audit.checkpoint_every for p in self.policies)

    def __iter__(self) -> Iterator[Policy]:
        return iter(self.policies)

    def __len__(self) -> int:
        return len(self.policies)


# -- loading ----------------------------------------------------------------------------------------------------

POLICY_SUFFIXES = (".json", ".yaml", ".yml")


def parse_document(path: Path) -> Any:
    """Read a JSON or YAML file; syntax errors become a ConfigError with the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise NotFoundError(f"no such file: {path}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), [ConfigIssue("", f"not UTF-8 text: {exc}", "save the file as UTF-8")]) from exc
    try:
        if path.suffix == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(str(path), [ConfigIssue(f"line {exc.lineno}", f"invalid JSON: {exc.msg}", "fix the syntax")]) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(str(path), [ConfigIssue(where, f"invalid YAML: {exc}", "fix the syntax")]) from exc


def issues_from_validation(model: type[BaseModel], exc: ValidationError) -> list[ConfigIssue]:
    """Turn pydantic errors into ConfigIssues with a dotted path and a concrete fix."""
    issues = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        path = ".".join(loc)
        kind = err["type"]
        if kind == "extra_forbidden":
            parent = _model_at(model, loc[:-1])
            known = sorted(parent.model_fields) if parent is not None else []
            close = difflib.get_close_matches(loc[-1], known, n=1)
            fix = f"did you mean {close[0]!r}?" if close else f"remove it; allowed keys here: {', '.join(known)}"
            issues.append(ConfigIssue(path, f"unknown key {loc[-1]!r}", fix))
        elif kind == "missing":
            issues.append(ConfigIssue(path, "required key is missing", f"add {loc[-1]!r}"))
        else:
            message = re.sub(r"^Value error, ", "", err["msg"])
            issues.append(ConfigIssue(path, message, _fix_for(kind, err)))
    return issues


def _fix_for(kind: str, err: Any) -> str:
    if kind.startswith(("int_", "greater_than", "less_than")):
        return "give a whole number in range"
    if kind.startswith("string_pattern"):
        return "use letters, digits and _.:/@- only"
    if kind in ("list_type", "dict_type", "string_type", "bool_type", "model_type"):
        return f"expected {kind.split('_')[0]}"
    if kind == "literal_error":
        return f"use one of {err.get('ctx', {}).get('expected', '')}"
    return ""


def _model_at(model: type[BaseModel], loc: list[str]) -> type[BaseModel] | None:
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part)
        if field is None:
            # a dict key (e.g. output_contracts.<name>): stay on the value type
            continue
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        candidates = [annotation, *args]
        for arg in list(candidates):
            candidates.extend(getattr(arg, "__args__", ()))
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return None
        current = nxt
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def policy_from_data(data: Any, source: str = "<policy>") -> Policy:
    if not isinstance(data, dict):
        raise ConfigError(source, [ConfigIssue("", "a policy must be a mapping (JSON object)", "start with {\"policy_id\": ...}")])
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, issues_from_validation(Policy, exc)) from exc


def load_policy(path: str | Path) -> Policy:
    p = Path(path)
    return policy_from_data(parse_document(p), str(p))


def policy_files(path: str | Path) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in POLICY_SUFFIXES and f.is_file())
        if not files:
            raise NotFoundError(f"no policy files (*.json, *.yaml) in {p}")
        return files
    if not p.exists():
        raise NotFoundError(f"no such policy file or directory: {p}")
    return [p]


def load_policies(path: str | Path) -> PolicySet:
    """Load one policy file or every *.json/*.yaml/*.yml in a directory; all errors of all files at once."""
    policies: list[Policy] = []
    sources: list[str] = []
    issues: list[ConfigIssue] = []
    for file in policy_files(path):
        try:
            policies.append(load_policy(file))
            sources.append(str(file))
        except ConfigError as exc:
            issues.extend(ConfigIssue(f"{file}:{i.path}", i.message, i.fix) for i in exc.issues)
    if issues:
        raise ConfigError(str(path), issues)
    return PolicySet(policies, sources)
