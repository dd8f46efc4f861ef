/* Shows one screen at a time: the view held in the model's `viewState`. */
(function (ChatApp, Backbone) {
  'use strict';

  ChatApp.views.ContainerView = Backbone.View.extend({
    initialize: function () {
      this.current = null;
      this.listenTo(this.model, 'change:viewState', this.render);
    },

    render: function () {
      var next = this.model.get('viewState');
      if (this.current && this.current !== next) {
        this.current.remove();
      }
      if (next && next !== this.current) {
        this.$el.empty().append(next.render().el);
        if (typeof next.shown === 'function') {
          next.shown();
        }
      }
      this.current = next;
      return this;
    }
  });
})(ChatApp, Backbone);
