//! The messages of protocol version 2 that version 3 changed, kept as they were on the wire
//! so a hub can serve the boxes that still speak version 2 (docs/PROTOCOL.md,
//! "Versioning"). Postcard is not self-describing: a message with one more field does not
//! decode as the old one, nor the old one as the new, so a changed message is a new type at
//! a new path, never an edit of the old one.

use serde::{Deserialize, Serialize};

use crate::{BoxStatus, ModuleCursor, ModuleDigest};

/// Path of the version 2 full sync: [`FullRequest`], answered by a
/// [`crate::ModulesAnswer`].
pub const PATH_FULL: &str = "/sync/v2/full";
/// Path of the version 2 acknowledgement: [`Ack`], answered by an empty message.
pub const PATH_ACK: &str = "/sync/v2/ack";

/// A version 2 full sync request: [`crate::FullRequest`] without the box's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FullRequest {
    pub modules: Vec<String>,
    pub digests: Vec<ModuleDigest>,
    pub records: Vec<String>,
}

/// A version 2 acknowledgement: [`crate::Ack`] without the modules' errors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub cursors: Vec<ModuleCursor>,
    pub pending_activity: u64,
    pub box_version: String,
}

impl From<FullRequest> for crate::FullRequest {
    /// A version 2 box says nothing of its status: an empty one, which the hub never
    /// records as an acknowledgement (see `storehub`'s sync API).
    fn from(r: FullRequest) -> crate::FullRequest {
        crate::FullRequest {
            modules: r.modules,
            digests: r.digests,
            records: r.records,
            status: BoxStatus::default(),
        }
    }
}

impl From<Ack> for crate::Ack {
    fn from(a: Ack) -> crate::Ack {
        crate::Ack {
            cursors: a.cursors,
            pending_activity: a.pending_activity,
            box_version: a.box_version,
            errors: Vec::new(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{decode, encode, Digest, ModuleError};

    /// The reason the version 2 types exist: each version's message decodes only as itself,
    /// so a hub must tell them apart by path.
    #[test]
    fn version_2_and_3_messages_do_not_decode_as_each_other() {
        let old = Ack {
            cursors: vec![ModuleCursor {
                module: "catalog".into(),
                cursor: 7,
            }],
            pending_activity: 2,
            box_version: "0.1.0".into(),
        };
        let body = encode(&old, 3).unwrap();
        assert_eq!(decode::<Ack>(&body, "v2").unwrap(), old);
        assert!(decode::<crate::Ack>(&body, "v3").is_err());
        let new = crate::Ack::from(old.clone());
        assert!(new.errors.is_empty());

        let request = crate::FullRequest {
            modules: vec![],
            digests: vec![ModuleDigest {
                module: "catalog".into(),
                cursor: 7,
                digest: Digest::default(),
            }],
            records: vec![],
            status: BoxStatus {
                pending_activity: 1,
                box_version: "0.2.0".into(),
                errors: vec![ModuleError {
                    module: "catalog".into(),
                    error: "boom".into(),
                }],
            },
        };
        let body = encode(&request, 3).unwrap();
        assert_eq!(decode::<crate::FullRequest>(&body, "v3").unwrap(), request);
        let old = FullRequest {
            modules: vec![],
            digests: request.digests.clone(),
            records: vec![],
        };
        let body = encode(&old, 3).unwrap();
        assert!(decode::<crate::FullRequest>(&body, "v3").is_err());
        let upgraded = crate::FullRequest::from(decode::<FullRequest>(&body, "v2").unwrap());
        assert_eq!(upgraded.status, BoxStatus::default());
    }
}
