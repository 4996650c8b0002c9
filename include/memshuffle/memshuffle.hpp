#pragma once
// The umbrella header: every public component of memshuffle (doctest.hpp excepted,
// since it needs doctest).
#include <memshuffle/error.hpp>
#include <memshuffle/arena_resource.hpp>
#include <memshuffle/tracking_resource.hpp>
#include <memshuffle/secure_page_resource.hpp>
#include <memshuffle/secret_backend.hpp>
#include <memshuffle/secret_pool_resource.hpp>
#include <memshuffle/resource_adaptors.hpp>
#include <memshuffle/cipher.hpp>
#include <memshuffle/os_random.hpp>
#include <memshuffle/secure_wipe.hpp>
#include <memshuffle/shuffler.hpp>
