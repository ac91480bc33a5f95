"""Review pages: reviewers work the dataset's review queues in a browser (``distillgate review serve``).

Built on ``distillgate.data.review`` (queues, leases, accept/correct/reject with optimistic concurrency, review
events); this package only renders pages, signs reviewers in and asks the policy who may review. See
docs/review-web.md.
"""

from distillgate.web.app import create_app
from distillgate.web.site import ReviewSite

__all__ = ["ReviewSite", "create_app", "serve"]


def serve(site: ReviewSite, *, host: str = "127.0.0.1", port: int = 8090) -> None:
    """Serve ``site`` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(site), host=host, port=port, log_level="info")
