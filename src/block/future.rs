//! The future a node's I/O call returns.
//!
//! Most calls go through a driver's `async fn` and need a box (the futures
//! nest by graph depth, and their types cannot be named). Calls that finish
//! at once -- null-co, a refused write, a discard the node ignores -- are
//! `Ready` and allocate nothing.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::future::LocalBoxFuture;

use super::BlockError;

pub enum BlockFuture<'a> {
    Ready(Option<Result<(), BlockError>>),
    Boxed(LocalBoxFuture<'a, Result<(), BlockError>>),
}

impl<'a> BlockFuture<'a> {
    pub fn ready(r: Result<(), BlockError>) -> Self {
        BlockFuture::Ready(Some(r))
    }

    pub fn boxed(f: impl Future<Output = Result<(), BlockError>> + 'a) -> Self {
        BlockFuture::Boxed(Box::pin(f))
    }
}

impl Future for BlockFuture<'_> {
    type Output = Result<(), BlockError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            BlockFuture::Ready(r) => {
                Poll::Ready(r.take().expect("BlockFuture polled after it completed"))
            }
            BlockFuture::Boxed(f) => f.as_mut().poll(cx),
        }
    }
}
