//! The server's copy of the ranges document: downloaded when needed, kept for a bounded time.
//!
//! This module owns when the document is downloaded, not how (that is the loader's job, see
//! `fetch`): [`Cache::get`] returns the parsed index while it is younger than the TTL, and
//! otherwise downloads and parses it again. One download at a time: queries that arrive while a
//! download is running wait for it and share its result, success or failure, so 50 clients at
//! once cause one download, and a failing endpoint costs one attempt per wave of queries rather
//! than one per query. A failure is not cached: the next query after it tries again.
//!
//! When a refresh fails, queries are answered from the last good copy for at most `max_stale`
//! past its TTL (each failed attempt is one WARN line saying how old the copy is); after that
//! they get the download error, saying that the last copy is too old to serve. A failure with no
//! copy at all is just the download error.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::ranges::RangesIndex;

/// Downloads the document; the error says what failed and how to fix it.
pub type Loader =
    Box<dyn Fn() -> Pin<Box<dyn Future<Output = Result<Vec<u8>, String>> + Send>> + Send + Sync>;

struct State {
    /// The index and when its download finished.
    current: Option<(Instant, Arc<RangesIndex>)>,
    /// The error of the last attempt, if it failed.
    last_error: Option<String>,
}

/// A TTL cache of the parsed document with single-flight downloads.
pub struct Cache {
    loader: Loader,
    /// Where the document comes from, for error messages (the URL).
    source: String,
    ttl: Duration,
    /// How long past its TTL the last good copy may still answer while refreshes fail.
    max_stale: Duration,
    /// Download attempts finished so far (read without the lock, to spot a shared result).
    finished: AtomicU64,
    state: Mutex<State>,
}

impl Cache {
    /// A cache that keeps each download from `source` (named in errors) for `ttl`, and serves
    /// it for up to `max_stale` more while refreshes fail.
    pub fn new(loader: Loader, source: String, ttl: Duration, max_stale: Duration) -> Cache {
        Cache {
            loader,
            source,
            ttl,
            max_stale,
            finished: AtomicU64::new(0),
            state: Mutex::new(State {
                current: None,
                last_error: None,
            }),
        }
    }

    /// The current index, downloading it first if there is none or it is older than the TTL.
    pub async fn get(&self) -> Result<Arc<RangesIndex>, String> {
        let seen = self.finished.load(Ordering::Acquire);
        let mut state = self.state.lock().await;
        if let Some((at, index)) = &state.current {
            if at.elapsed() < self.ttl {
                return Ok(index.clone());
            }
        }
        // A download finished while this query waited for the lock: share its failure
        // instead of starting another attempt right away.
        if self.finished.load(Ordering::Acquire) != seen {
            if let Some(error) = state.last_error.clone() {
                return self.last_good(&state, error, false);
            }
        }
        let result = match (self.loader)().await {
            Ok(document) => RangesIndex::parse(&document)
                .map(|index| (document.len(), index))
                .map_err(|e| format!("the document downloaded from {}: {e}", self.source)),
            Err(e) => Err(e),
        };
        self.finished.fetch_add(1, Ordering::AcqRel);
        match result {
            Ok((bytes, index)) => {
                info!(
                    bytes,
                    regions_with_s3 = index.region_count(),
                    keep_for = %humantime::format_duration(self.ttl),
                    "downloaded the ranges document"
                );
                let index = Arc::new(index);
                state.current = Some((Instant::now(), index.clone()));
                state.last_error = None;
                Ok(index)
            }
            Err(e) => {
                state.last_error = Some(e.clone());
                self.last_good(&state, e, true)
            }
        }
    }

    /// After a failed refresh (`error`): the last good copy while it is within `max_stale` past
    /// its TTL, else the error, saying why the copy is no longer served. `log` for the query
    /// that made the attempt (the ones that shared its result stay quiet).
    fn last_good(
        &self,
        state: &State,
        error: String,
        log: bool,
    ) -> Result<Arc<RangesIndex>, String> {
        let Some((at, index)) = &state.current else {
            return Err(error);
        };
        let age = at.elapsed();
        let limit = self.ttl.saturating_add(self.max_stale);
        let rounded = |d: Duration| humantime::format_duration(Duration::from_secs(d.as_secs()));
        if age < limit {
            if log {
                warn!(
                    age = %rounded(age),
                    served_until_age = %rounded(limit),
                    "refreshing the ranges document failed, answering from the last good copy: {error}"
                );
            }
            return Ok(index.clone());
        }
        Err(format!(
            "{error}; the last good copy is {} old, more than --cache-ttl {} plus --max-stale {}, so it is no longer served",
            rounded(age),
            humantime::format_duration(self.ttl),
            humantime::format_duration(self.max_stale)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    const DOC: &[u8] =
        br#"{"prefixes": [{"ip_prefix": "3.5.0.0/19", "region": "us-east-1", "service": "S3"}]}"#;

    /// A loader that counts its calls, takes 100 ms, and fails while `failing` is set.
    fn loader(calls: Arc<AtomicUsize>, failing: Arc<std::sync::atomic::AtomicBool>) -> Loader {
        Box::new(move || {
            let calls = calls.clone();
            let failing = failing.clone();
            Box::pin(async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                if failing.load(Ordering::SeqCst) {
                    Err("endpoint down".to_owned())
                } else {
                    Ok(DOC.to_vec())
                }
            })
        })
    }

    fn setup(
        fail: bool,
    ) -> (
        Arc<Cache>,
        Arc<AtomicUsize>,
        Arc<std::sync::atomic::AtomicBool>,
    ) {
        let calls = Arc::new(AtomicUsize::new(0));
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(fail));
        let cache = Arc::new(Cache::new(
            loader(calls.clone(), failing.clone()),
            "test".into(),
            Duration::from_secs(600),
            Duration::from_secs(3600),
        ));
        (cache, calls, failing)
    }

    async fn many(cache: &Arc<Cache>, n: usize) -> Vec<Result<Arc<RangesIndex>, String>> {
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get().await })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_queries_share_one_download() {
        let (cache, calls, _) = setup(false);
        let results = many(&cache, 50).await;
        assert!(results.iter().all(|r| r.is_ok()));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let index = cache.get().await.unwrap();
        assert_eq!(index.s3_prefixes("us-east-1", false), ["3.5.0.0/19"]);
        assert_eq!(calls.load(Ordering::SeqCst), 1, "served from the cache");
    }

    #[tokio::test(start_paused = true)]
    async fn downloads_again_after_the_ttl() {
        let (cache, calls, _) = setup(false);
        cache.get().await.unwrap();
        tokio::time::sleep(Duration::from_secs(599)).await;
        cache.get().await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_secs(2)).await;
        cache.get().await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_queries_share_a_failure_and_the_next_one_retries() {
        let (cache, calls, failing) = setup(true);
        let results = many(&cache, 20).await;
        assert!(results
            .iter()
            .all(|r| r.as_ref().unwrap_err() == "endpoint down"));
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one attempt for the wave");
        failing.store(false, Ordering::SeqCst);
        cache.get().await.expect("a later query tries again");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_refresh_answers_from_the_last_good_copy_until_max_stale() {
        // TTL 600 s, max-stale 3600 s: the copy answers until it is 4200 s old.
        let (cache, calls, failing) = setup(false);
        cache.get().await.unwrap();
        failing.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(601)).await;
        let results = many(&cache, 5).await;
        for r in &results {
            let index = r.as_ref().expect("the last good copy answers");
            assert_eq!(index.s3_prefixes("us-east-1", false), ["3.5.0.0/19"]);
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "one failed refresh for the wave"
        );

        tokio::time::sleep(Duration::from_secs(3500)).await; // 4102 s old (+ 100 ms loads)
        assert!(cache.get().await.is_ok(), "still within max-stale");
        tokio::time::sleep(Duration::from_secs(100)).await; // past 4200 s
        let err = cache.get().await.unwrap_err();
        assert!(
            err.starts_with("endpoint down; the last good copy is"),
            "{err}"
        );
        assert!(err.contains("--max-stale 1h"), "{err}");
        let shared = many(&cache, 3).await;
        assert!(
            shared.iter().all(|r| r.is_err()),
            "no stale copy past the bound"
        );

        // The endpoint recovers: a fresh copy, and the clock starts again.
        failing.store(false, Ordering::SeqCst);
        assert!(cache.get().await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn max_stale_zero_never_answers_from_an_expired_copy() {
        let calls = Arc::new(AtomicUsize::new(0));
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cache = Cache::new(
            loader(calls, failing.clone()),
            "test".into(),
            Duration::from_secs(600),
            Duration::ZERO,
        );
        cache.get().await.unwrap();
        failing.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(601)).await;
        assert!(cache.get().await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn an_unparsable_document_is_an_error() {
        let cache = Cache::new(
            Box::new(|| Box::pin(async { Ok(b"<html>".to_vec()) })),
            "https://example.test/doc".into(),
            Duration::from_secs(60),
            Duration::from_secs(60),
        );
        let err = cache.get().await.unwrap_err();
        assert!(err.contains("not an ip-ranges.json document"), "{err}");
        assert!(err.contains("https://example.test/doc"), "{err}");
    }
}
