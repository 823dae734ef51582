package docker

// What the tests of package docker_test, which run a whole manager on the
// runtime, look at inside it.

// ContainerGone reports whether err says the container does not exist.
var ContainerGone = containerGone

// Unremoved counts the containers whose removal waits for the daemon to
// be reachable again.
func (r *Runtime) Unremoved() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.unremoved)
}
