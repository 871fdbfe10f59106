//! A value that is replaced whole while readers keep the version they took.
//!
//! This module owns the one pattern the daemon uses for everything a reload changes (the policy,
//! the routes being served, a route's settings): readers take an `Arc` of the current version
//! and keep it for as long as they need one consistent view (a connection keeps the policy it
//! was checked against); a reload swaps in a new version for whoever reads next.

use std::sync::{Arc, RwLock};

/// See the module docs.
#[derive(Debug)]
pub struct Current<T>(RwLock<Arc<T>>);

impl<T> Current<T> {
    pub fn new(value: T) -> Current<T> {
        Current(RwLock::new(Arc::new(value)))
    }

    /// The version as of now.
    pub fn get(&self) -> Arc<T> {
        // A poisoned lock still holds a whole Arc: a panic cannot leave it half-written.
        match self.0.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Makes `value` the version readers get from now on.
    pub fn set(&self, value: T) {
        let new = Arc::new(value);
        match self.0.write() {
            Ok(mut guard) => *guard = new,
            Err(poisoned) => *poisoned.into_inner() = new,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_keep_the_version_they_took() {
        let current = Current::new(1);
        let before = current.get();
        current.set(2);
        assert_eq!((*before, *current.get()), (1, 2));
    }
}
