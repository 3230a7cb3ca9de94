################################################################################
#
# storebox
#
################################################################################

# The repository this external tree belongs to, fetched with git so that the
# cargo-package download step vendors the crates of Cargo.lock into the
# source tarball (a local site method would skip that step).
STOREBOX_SITE = $(realpath $(BR2_EXTERNAL_STOREBOX_PATH)/..)
STOREBOX_SITE_METHOD = git
STOREBOX_VERSION = $(call qstrip,$(BR2_PACKAGE_STOREBOX_VERSION))
ifeq ($(STOREBOX_VERSION),)
STOREBOX_VERSION = $(shell git -C $(STOREBOX_SITE) rev-parse HEAD)
endif
STOREBOX_LICENSE = Apache-2.0

# Only the appliance (the root package): storehub runs in the retailer's data
# centre. `cargo install --path ./` installs the root package's binary alone.
STOREBOX_CARGO_BUILD_OPTS = -p storebox
# The project's release profile (LTO, one codegen unit) whatever BR2_ENABLE_LTO
# says: it is what the binary size figures and the tests are measured with.
STOREBOX_CARGO_ENV = \
	CARGO_PROFILE_RELEASE_LTO=true \
	CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1

define STOREBOX_USERS
	storebox -1 storebox -1 * /var/lib/storebox - - storebox appliance daemon
endef

$(eval $(cargo-package))
