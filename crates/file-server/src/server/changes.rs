//! Noticing changes: inotify watches on the directories of cached (and known-absent) files,
//! bounded and released with them, and a revalidation that goes round every cached file for
//! what inotify cannot see.

use super::*;

impl State {
    /// One more cached chunk or absence in `dir`: watched from now on, if it is not yet and a
    /// watch is to be had.
    pub(super) fn use_dir(&mut self, dir: &str) {
        *self.dir_users.entry(dir.to_string()).or_insert(0) += 1;
        self.watch(dir);
    }

    /// One fewer in `dir`; its watch goes with the last.
    pub(super) fn release_dir(&mut self, dir: &str) {
        let Some(n) = self.dir_users.get_mut(dir) else {
            return;
        };
        *n = n.saturating_sub(1);
        if *n > 0 {
            return;
        }
        self.dir_users.remove(dir);
        if let Some(wd) = self.watched_dirs.remove(dir) {
            self.watches.remove(&wd);
            if let Some(ino) = &self.inotify {
                // Its IN_IGNORED event finds no directory for `wd`, and is skipped.
                let _ = rustix::fs::inotify::remove_watch(ino, wd);
            }
        }
    }

    /// Watches `dir`, once, within the watch budget.
    pub(super) fn watch(&mut self, dir: &str) {
        let Some(ino) = &self.inotify else { return };
        if self.watched_dirs.contains_key(dir) || self.watched_dirs.len() >= self.cfg.max_watches {
            return;
        }
        use rustix::fs::inotify::WatchFlags as W;
        let flags = W::MODIFY
            | W::ATTRIB
            | W::CLOSE_WRITE
            | W::MOVED_FROM
            | W::MOVED_TO
            | W::DELETE
            | W::CREATE
            | W::DELETE_SELF
            | W::MOVE_SELF
            | W::DONT_FOLLOW
            | W::EXCL_UNLINK;
        match rustix::fs::inotify::add_watch(ino, self.cfg.root.join(dir), flags) {
            Ok(wd) => {
                self.watches.insert(wd, dir.to_string());
                self.watched_dirs.insert(dir.to_string(), wd);
            }
            // Out of watches (or the directory just went away): revalidation still covers it.
            Err(e) => tracing::debug!("cannot watch {dir:?}: {e}"),
        }
    }

    /// Retires cached chunks of files that inotify reports changed. Returns events handled.
    pub(super) fn file_changes(&mut self) -> usize {
        let Some(ino) = &self.inotify else { return 0 };
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 8192];
        let mut reader = rustix::fs::inotify::Reader::new(ino, &mut buf);
        let mut changed: Vec<(Option<String>, bool)> = Vec::new(); // (path or dir, whole dir)
        let mut overflow = false;
        let mut n = 0;
        while let Ok(ev) = reader.next() {
            n += 1;
            use rustix::fs::inotify::ReadFlags as R;
            let flags = ev.events();
            if flags.contains(R::QUEUE_OVERFLOW) {
                overflow = true;
                continue;
            }
            let Some(dir) = self.watches.get(&ev.wd()).cloned() else {
                continue;
            };
            if flags.intersects(R::DELETE_SELF | R::MOVE_SELF | R::IGNORED) {
                changed.push((Some(dir), true));
                continue;
            }
            if let Some(name) = ev.file_name().and_then(|c| c.to_str().ok()) {
                let path = if dir.is_empty() {
                    name.to_string()
                } else {
                    format!("{dir}/{name}")
                };
                changed.push((Some(path), false));
            }
        }
        if overflow {
            self.revalidate();
        }
        for (what, whole_dir) in changed {
            let Some(p) = what else { continue };
            let prefix = format!("{p}/");
            let affected = |path: &str| {
                if whole_dir {
                    p.is_empty() || path.starts_with(&prefix)
                } else {
                    path == p
                }
            };
            let gone: Vec<String> = self
                .absent
                .iter()
                .filter(|a| affected(a))
                .cloned()
                .collect();
            let doomed: Vec<Key> = self
                .cache
                .keys()
                .filter(|(path, _)| affected(path))
                .cloned()
                .collect();
            for a in gone {
                self.forget_absent(&a);
            }
            if whole_dir {
                // The kernel dropped this watch (the directory went); what it covered goes next.
                if let Some(wd) = self.watched_dirs.remove(&p) {
                    self.watches.remove(&wd);
                }
            }
            for key in doomed {
                if self.uncache(&key) {
                    self.stats.retired.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if n > 0 {
            self.publish_stats();
        }
        n
    }

    /// Retires cached chunks whose file changed or went away, and absences that ended: up to
    /// `REVALIDATE_BATCH` of each per pass, going on from where the last pass stopped, so that
    /// every one is checked in turn however many there are. A file of several chunks is
    /// opened once for all of them.
    pub(super) fn revalidate(&mut self) {
        let absent: Vec<String> = match &self.absent_revalidated_to {
            Some(from) => self
                .absent
                .range::<String, _>((Bound::Excluded(from), Bound::Unbounded))
                .take(REVALIDATE_BATCH)
                .cloned()
                .collect(),
            None => self.absent.iter().take(REVALIDATE_BATCH).cloned().collect(),
        };
        self.absent_revalidated_to = if absent.len() < REVALIDATE_BATCH {
            None // the end of the lap: the next pass starts again from the first
        } else {
            absent.last().cloned()
        };
        for path in absent {
            if !matches!(self.root.open(&path), Err(OpenError::NotFound)) {
                self.forget_absent(&path);
            }
        }
        let keys: Vec<Key> = match &self.revalidated_to {
            Some(from) => self
                .cache
                .range::<Key, _>((Bound::Excluded(from), Bound::Unbounded))
                .take(REVALIDATE_BATCH)
                .map(|(k, _)| k.clone())
                .collect(),
            None => self.cache.keys().take(REVALIDATE_BATCH).cloned().collect(),
        };
        self.revalidated_to = if keys.len() < REVALIDATE_BATCH {
            None
        } else {
            keys.last().cloned()
        };
        // Keys are in (path, chunk) order: the chunks of one file come together.
        let mut last: Option<(String, Option<Version>)> = None;
        for key in keys {
            let fresh = match &last {
                Some((p, v)) if *p == key.0 => *v,
                _ => {
                    let v = self.root.open(&key.0).map(|o| Version::of(&o.stat)).ok();
                    last = Some((key.0.clone(), v));
                    v
                }
            };
            let stale = self
                .cache
                .get(&key)
                .is_some_and(|c| Some(c.segment.version()) != fresh);
            if stale && self.uncache(&key) {
                self.stats.retired.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.publish_stats();
    }
}
