#include "registry.h"

namespace megapre::data {

std::vector<Binder>& binders() {
  static std::vector<Binder> all;  // function-local: safe whatever the static init order
  return all;
}

}  // namespace megapre::data
