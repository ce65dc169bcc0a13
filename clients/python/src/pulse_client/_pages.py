"""Lazy iteration over token-paged List RPCs."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Generic, Protocol, TypeVar, overload

from google.protobuf.message import Message

__all__ = ["AsyncPager", "Page", "Pager"]

T = TypeVar("T")


class _PageResponse(Protocol):
    @property
    def next_page_token(self) -> str: ...


R = TypeVar("R", bound=_PageResponse)


class Page(Sequence[T]):
    """One page of a List call: a sequence of its items.

    Attributes:
        next_page_token: The token of the following page; "" on the last page.
        response: The raw response message (e.g. ``ListDevicesResponse``).
    """

    __slots__ = ("_items", "next_page_token", "response")

    def __init__(self, items: Iterable[T], next_page_token: str, response: Message) -> None:
        self._items: tuple[T, ...] = tuple(items)
        self.next_page_token = next_page_token
        self.response = response

    @overload
    def __getitem__(self, index: int) -> T: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[T]: ...
    def __getitem__(self, index: int | slice) -> T | Sequence[T]:
        return self._items[index]

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Page({list(self._items)!r}, next_page_token={self.next_page_token!r})"


def _page(response: R, items: Callable[[R], Iterable[T]]) -> Page[T]:
    # Every generated response is a Message; the protocol bound only names the
    # one field paging relies on.
    assert isinstance(response, Message)
    return Page(items(response), response.next_page_token, response)


class AsyncPager(Generic[T]):
    """All items of an async List call, fetched page by page on demand.

    ``async for item in pager`` walks the items of every page; ``pager.pages``
    yields the pages themselves. Nothing is fetched until iteration starts, and
    each new iteration starts again from the first page.
    """

    def __init__(
        self, fetch: Callable[[str], Awaitable[R]], items: Callable[[R], Iterable[T]]
    ) -> None:
        """Creates a pager; nothing is fetched yet.

        Args:
            fetch: Fetches the page for a page token ("" for the first page).
            items: Picks the items out of a page response.
        """

        async def fetch_page(token: str) -> Page[T]:
            return _page(await fetch(token), items)

        self._fetch_page = fetch_page

    @property
    def pages(self) -> AsyncIterator[Page[T]]:
        """The pages, in order, until one has an empty ``next_page_token``."""
        return self._pages()

    async def _pages(self) -> AsyncIterator[Page[T]]:
        token = ""
        while True:
            page = await self._fetch_page(token)
            yield page
            token = page.next_page_token
            if not token:
                return

    def __aiter__(self) -> AsyncIterator[T]:
        return self._items()

    async def _items(self) -> AsyncIterator[T]:
        async for page in self._pages():
            for item in page:
                yield item


class Pager(Generic[T]):
    """All items of a blocking List call; see :class:`AsyncPager`."""

    def __init__(self, fetch: Callable[[str], R], items: Callable[[R], Iterable[T]]) -> None:
        """Creates a pager; nothing is fetched yet.

        Args:
            fetch: Fetches the page for a page token ("" for the first page).
            items: Picks the items out of a page response.
        """

        def fetch_page(token: str) -> Page[T]:
            return _page(fetch(token), items)

        self._fetch_page = fetch_page

    @property
    def pages(self) -> Iterator[Page[T]]:
        """The pages, in order, until one has an empty ``next_page_token``."""
        return self._pages()

    def _pages(self) -> Iterator[Page[T]]:
        token = ""
        while True:
            page = self._fetch_page(token)
            yield page
            token = page.next_page_token
            if not token:
                return

    def __iter__(self) -> Iterator[T]:
        for page in self._pages():
            yield from page
