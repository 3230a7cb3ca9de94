//! `storebox migrate`: brings the local database's schema up to the one this binary knows,
//! before the daemon starts. On the appliance it runs as `storebox-migrate.service`, a
//! oneshot ordered before `storebox.service` (the Bottlerocket pattern: data migrations are
//! a step of their own, not a side effect of the daemon's start).
//!
//! The schema version lives in the `meta` table under `schema_version`. A database written
//! before the entry existed is schema 1 (the first and so far only schema), as is a new one.
//! There are no migration steps yet: schema 1 is current. What this module already does is
//! refuse data written by a newer binary (an image rolled back after its successor migrated
//! the data), with an error that says so, instead of letting the daemon misread it.
//!
//! The daemon itself only checks ([`check`]) and never writes the version: migrating is this
//! command's job alone.
//!
//! Owns: the schema version and the list of migration steps. Knows nothing about HTTP, the
//! hub or the journal's record format.

use std::path::{Path, PathBuf};

use crate::storage::{BoxStore, StorageError};

/// The schema this binary reads and writes.
pub const SCHEMA_VERSION: u64 = 1;

/// The `meta` entry holding the schema version.
pub const SCHEMA_KEY: &str = "schema_version";

/// A migration step: from schema `n` (its index + 1) to `n + 1`. Empty while schema 1 is the
/// only one; a step must be idempotent, since a power cut can stop it after any commit and
/// the next boot runs it again.
type Step = fn(&BoxStore) -> Result<(), StorageError>;
const STEPS: &[Step] = &[];

/// What `migrate` found and did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The version was already current; nothing was written.
    Current,
    /// The database had no version (new, or written before versions were recorded) and is
    /// now marked as the current schema.
    Recorded,
    /// These steps ran, from the first version to the second.
    Migrated { from: u64, to: u64 },
    /// The data was newer than this release knows; the copy of schema `to` made before it
    /// was migrated was put back.
    Restored { from: u64, to: u64 },
}

/// Errors of the migration, each naming the database file.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(
        "{path}: the data is schema {found}, newer than this storebox knows (schema \
         {SCHEMA_VERSION}); it was written by a newer release. Boot that release again, or \
         move the data directory aside to start empty (a full sync refills it; activity not \
         yet pushed to the hub would be lost)"
    )]
    Newer { path: PathBuf, found: u64 },
    #[error(
        "{path}: schema version {found} is not one storebox ever wrote; the file may be damaged"
    )]
    Invalid { path: PathBuf, found: u64 },
    #[error(
        "{path}: the data is schema {found}; this storebox needs schema {SCHEMA_VERSION}: run \
         `storebox migrate` first"
    )]
    Older { path: PathBuf, found: u64 },
    #[error("{path}: migrating from schema {from} to {}", from + 1)]
    Step {
        path: PathBuf,
        from: u64,
        #[source]
        source: StorageError,
    },
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Storage {
        path: PathBuf,
        #[source]
        source: StorageError,
    },
}

/// The database file under `data_dir`, for messages.
fn db_path(data_dir: &Path) -> PathBuf {
    data_dir.join(BoxStore::FILE_NAME)
}

/// Brings the database in `data_dir` to [`SCHEMA_VERSION`]: records the version on a
/// database that has none, runs the steps from an older one, refuses a newer one.
#[cfg(test)]
pub fn migrate(store: &BoxStore, data_dir: &Path) -> Result<Outcome, MigrateError> {
    migrate_to(store, data_dir, SCHEMA_VERSION, STEPS)
}

fn migrate_to(
    store: &BoxStore,
    data_dir: &Path,
    known: u64,
    steps: &[Step],
) -> Result<Outcome, MigrateError> {
    let path = db_path(data_dir);
    let storage = |source| MigrateError::Storage {
        path: path.clone(),
        source,
    };
    let found = store.meta(SCHEMA_KEY).map_err(storage)?;
    let Some(found) = found else {
        store.set_meta(SCHEMA_KEY, known).map_err(storage)?;
        return Ok(Outcome::Recorded);
    };
    match found {
        0 => Err(MigrateError::Invalid { path, found }),
        v if v > known => Err(MigrateError::Newer { path, found }),
        v if v == known => Ok(Outcome::Current),
        from => {
            for version in from..known {
                // Each step is committed with its new version, so a power cut resumes at
                // the step it stopped in.
                let step = step_in(steps, version).ok_or(MigrateError::Invalid {
                    path: path.clone(),
                    found: version,
                })?;
                step(store).map_err(|source| MigrateError::Step {
                    path: path.clone(),
                    from: version,
                    source,
                })?;
                store.set_meta(SCHEMA_KEY, version + 1).map_err(storage)?;
            }
            Ok(Outcome::Migrated { from, to: known })
        }
    }
}

/// The step from `version` to `version + 1`.
#[cfg(test)]
fn step_from(version: u64) -> Option<Step> {
    step_in(STEPS, version)
}

fn step_in(steps: &[Step], version: u64) -> Option<Step> {
    let index = usize::try_from(version.checked_sub(1)?).ok()?;
    steps.get(index).copied()
}

/// `storebox migrate`, with the data kept readable across an update and its rollback:
/// before the first step of a migration the database is copied to
/// `ota/rollback/storebox-schema<N>.redb`; a release that finds data newer than it knows and
/// a copy of its own schema there puts the copy back (the newer data is kept beside it) and
/// carries on. The copies go once the new slot is marked good (`ota.rs`). What the copy
/// does not have is refilled by the next full sync; activity lives in the journal, which
/// a migration never touches, and what the copy's older push mark re-sends the hub drops as
/// duplicates.
pub fn run(data_dir: &Path, cache_mib: usize) -> anyhow::Result<Outcome> {
    run_with(data_dir, cache_mib, SCHEMA_VERSION, STEPS)
}

fn run_with(
    data_dir: &Path,
    cache_mib: usize,
    known: u64,
    steps: &[Step],
) -> anyhow::Result<Outcome> {
    let path = db_path(data_dir);
    let storage = |source| MigrateError::Storage {
        path: path.clone(),
        source,
    };
    let io = |what: String, source: std::io::Error| MigrateError::Io {
        path: path.clone(),
        what,
        source,
    };
    let open = || BoxStore::open(data_dir, cache_mib);
    let store = open()?;
    let found = store.meta(SCHEMA_KEY).map_err(storage)?;
    let rollback = crate::ota::Paths::new(data_dir).rollback();
    let copy_of = |v: u64| rollback.join(format!("storebox-schema{v}.redb"));
    match found {
        Some(found) if found > known => {
            let Some((v, copy)) = (1..=known)
                .rev()
                .map(|v| (v, copy_of(v)))
                .find(|(_, c)| c.is_file())
            else {
                return Err(MigrateError::Newer { path, found }.into());
            };
            drop(store);
            std::fs::rename(&path, copy_of(found))
                .map_err(|e| io(format!("keeping the schema {found} data aside"), e))?;
            copy_file(&copy, &path).map_err(|e| io(format!("restoring {}", copy.display()), e))?;
            tracing::warn!(
                "{}: schema {found} data from a newer release kept as {}; the schema {v} copy \
                 made before it migrated is back in place",
                path.display(),
                copy_of(found).display()
            );
            let store = open()?;
            migrate_to(&store, data_dir, known, steps)?;
            Ok(Outcome::Restored { from: found, to: v })
        }
        Some(found) if found > 0 && found < known => {
            drop(store);
            std::fs::create_dir_all(&rollback)
                .map_err(|e| io(format!("creating {}", rollback.display()), e))?;
            copy_file(&path, &copy_of(found))
                .map_err(|e| io(format!("copying the data to {}", rollback.display()), e))?;
            let store = open()?;
            Ok(migrate_to(&store, data_dir, known, steps)?)
        }
        _ => Ok(migrate_to(&store, data_dir, known, steps)?),
    }
}

/// Copies `from` to `to` durably: a temporary file, synced, then renamed.
fn copy_file(from: &Path, to: &Path) -> std::io::Result<()> {
    let tmp = to.with_extension("tmp");
    std::fs::copy(from, &tmp)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, to)?;
    if let Some(dir) = to.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// What the daemon runs at open: the data must be the current schema, or unversioned
/// (schema 1, or a new database on a machine without the migrate unit, like a developer's).
pub fn check(store: &BoxStore, data_dir: &Path) -> Result<(), MigrateError> {
    let path = db_path(data_dir);
    match store
        .meta(SCHEMA_KEY)
        .map_err(|source| MigrateError::Storage {
            path: path.clone(),
            source,
        })? {
        None => Ok(()),
        Some(v) if v == SCHEMA_VERSION => Ok(()),
        Some(0) => Err(MigrateError::Invalid { path, found: 0 }),
        Some(found) if found > SCHEMA_VERSION => Err(MigrateError::Newer { path, found }),
        Some(found) => Err(MigrateError::Older { path, found }),
    }
}

// A failed unwrap is the test's answer.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> BoxStore {
        BoxStore::open(dir, 4).unwrap()
    }

    #[test]
    fn records_the_version_once_then_does_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        assert_eq!(store.meta(SCHEMA_KEY).unwrap(), None);
        check(&store, dir.path()).unwrap();
        assert_eq!(migrate(&store, dir.path()).unwrap(), Outcome::Recorded);
        assert_eq!(store.meta(SCHEMA_KEY).unwrap(), Some(SCHEMA_VERSION));
        assert_eq!(migrate(&store, dir.path()).unwrap(), Outcome::Current);
        check(&store, dir.path()).unwrap();
        drop(store);
        // The version is on disk, not in memory.
        let store = open(dir.path());
        assert_eq!(store.meta(SCHEMA_KEY).unwrap(), Some(SCHEMA_VERSION));
        assert_eq!(migrate(&store, dir.path()).unwrap(), Outcome::Current);
    }

    #[test]
    fn keeps_the_data_and_the_push_mark() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.save_pushed_through(42).unwrap();
        migrate(&store, dir.path()).unwrap();
        assert_eq!(store.pushed_through().unwrap(), 42);
    }

    #[test]
    fn refuses_a_newer_schema_and_leaves_it_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.set_meta(SCHEMA_KEY, SCHEMA_VERSION + 1).unwrap();
        let err = migrate(&store, dir.path()).unwrap_err();
        assert!(matches!(err, MigrateError::Newer { found, .. } if found == SCHEMA_VERSION + 1));
        let text = err.to_string();
        assert!(text.contains("storebox.redb"), "{text}");
        assert!(text.contains("newer than this storebox knows"), "{text}");
        assert_eq!(store.meta(SCHEMA_KEY).unwrap(), Some(SCHEMA_VERSION + 1));
        assert!(matches!(
            check(&store, dir.path()),
            Err(MigrateError::Newer { .. })
        ));
    }

    fn to_two(store: &BoxStore) -> Result<(), StorageError> {
        store.set_meta("step_ran", 1)
    }

    #[test]
    fn a_migration_keeps_a_copy_that_a_rollback_puts_back() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            store.set_meta(SCHEMA_KEY, 1).unwrap();
            store.save_pushed_through(7).unwrap();
        }
        // The new release (schema 2) migrates, keeping a copy of schema 1.
        let steps: &[Step] = &[to_two];
        assert_eq!(
            run_with(dir.path(), 4, 2, steps).unwrap(),
            Outcome::Migrated { from: 1, to: 2 }
        );
        let copy = dir.path().join("ota/rollback/storebox-schema1.redb");
        assert!(copy.is_file());
        {
            let store = open(dir.path());
            assert_eq!(store.meta(SCHEMA_KEY).unwrap(), Some(2));
            assert_eq!(store.meta("step_ran").unwrap(), Some(1));
            store.save_pushed_through(9).unwrap();
        }
        // Rolled back, the old release (schema 1) finds schema 2 and its own copy.
        assert_eq!(
            run_with(dir.path(), 4, 1, &[]).unwrap(),
            Outcome::Restored { from: 2, to: 1 }
        );
        let store = open(dir.path());
        assert_eq!(store.meta(SCHEMA_KEY).unwrap(), Some(1));
        assert_eq!(store.meta("step_ran").unwrap(), None);
        assert_eq!(store.pushed_through().unwrap(), 7);
        check(&store, dir.path()).unwrap();
        // The newer data is kept, not deleted.
        assert!(dir
            .path()
            .join("ota/rollback/storebox-schema2.redb")
            .is_file());
    }

    #[test]
    fn without_a_copy_newer_data_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            store.set_meta(SCHEMA_KEY, SCHEMA_VERSION + 1).unwrap();
        }
        let err = run(dir.path(), 4).unwrap_err();
        assert!(matches!(
            err.downcast_ref::<MigrateError>(),
            Some(MigrateError::Newer { .. })
        ));
        assert_eq!(
            open(dir.path()).meta(SCHEMA_KEY).unwrap(),
            Some(SCHEMA_VERSION + 1)
        );
    }

    #[test]
    fn refuses_version_zero() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.set_meta(SCHEMA_KEY, 0).unwrap();
        assert!(matches!(
            migrate(&store, dir.path()),
            Err(MigrateError::Invalid { found: 0, .. })
        ));
        assert!(matches!(
            check(&store, dir.path()),
            Err(MigrateError::Invalid { found: 0, .. })
        ));
    }

    #[test]
    fn every_older_schema_has_a_step() {
        // One step per schema before the current one, no more, no fewer.
        assert_eq!(STEPS.len() as u64, SCHEMA_VERSION - 1);
        let older = (1..=SCHEMA_VERSION).take_while(|v| *v < SCHEMA_VERSION);
        for version in older {
            assert!(
                step_from(version).is_some(),
                "no step from schema {version}"
            );
        }
        assert!(step_from(SCHEMA_VERSION).is_none());
        assert!(step_from(0).is_none());
    }
}
